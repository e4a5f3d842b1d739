"""The validate stage: is the body an OpenAI request this gateway may forward?

Types are checked by pydantic in strict mode (a string where a number belongs is an error, as it
is at OpenAI); sizes by the gateway's limits, so a huge body is refused before anything else reads
it. Unknown fields are kept and forwarded: providers add parameters faster than gateways do.

Whatever the parser cannot take is the caller's error, a 400, never a 500: invalid UTF-8 (a lone
surrogate escape included), NaN and Infinity (not JSON, and no provider takes them), numbers out of
a double's range, and bodies nested deeper than the JSON encoder re-renders (254 levels).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal, NotRequired

import orjson
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError, with_config
from typing_extensions import TypedDict  # pydantic needs this one below Python 3.12 (and brings it)

from tierwise_sidecar.errors import ApiError, bad_request

if TYPE_CHECKING:
    from tierwise_sidecar.exchange import Exchange, Reply
    from tierwise_sidecar.runtime import Runtime
    from tierwise_sidecar.state import SharedState

Kind = Literal["chat", "completions", "embeddings"]


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; the defaults fit every current OpenAI model."""

    max_body_bytes: int = 8 * 1024 * 1024
    max_messages: int = 2048
    max_output_tokens: int = 262_144
    max_choices: int = 16
    max_inputs: int = 2048


# The request shapes are TypedDicts checked by pydantic's TypeAdapter: the same strict rules and
# error locations as models, at half the cost per request (no model instances are built, and the
# body is only checked, never converted).
_OPEN = ConfigDict(extra="allow", strict=True)
# A model name goes into upstream bodies and log lines: no control characters (CR/LF, NUL, ...).
MODEL_PATTERN = r"^[^\x00-\x1f\x7f]+$"
_Model = Annotated[str, Field(min_length=1, max_length=256, pattern=MODEL_PATTERN)]
_Name = Annotated[str, Field(max_length=256)]
_Positive = Annotated[int, Field(ge=1)]
_Prompt = str | list[str] | list[int] | list[list[int]]


@with_config(_OPEN)
class _Message(TypedDict):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: NotRequired[str | list[dict[str, Any]] | None]
    name: NotRequired[_Name | None]


@with_config(_OPEN)
class _Sampling(TypedDict):
    model: _Model
    max_tokens: NotRequired[_Positive | None]
    n: NotRequired[_Positive | None]
    temperature: NotRequired[Annotated[float, Field(ge=0, le=2)] | None]
    top_p: NotRequired[Annotated[float, Field(ge=0, le=1)] | None]
    stream: NotRequired[bool | None]
    stream_options: NotRequired[dict[str, Any] | None]
    user: NotRequired[_Name | None]


@with_config(_OPEN)
class ChatRequest(_Sampling):
    messages: Annotated[list[_Message], Field(min_length=1)]
    max_completion_tokens: NotRequired[_Positive | None]
    tools: NotRequired[list[dict[str, Any]] | None]


@with_config(_OPEN)
class CompletionRequest(_Sampling):
    prompt: _Prompt


@with_config(_OPEN)
class EmbeddingRequest(TypedDict):
    model: _Model
    input: _Prompt
    user: NotRequired[_Name | None]


_SHAPES: dict[Kind, TypeAdapter[Any]] = {
    "chat": TypeAdapter(ChatRequest),
    "completions": TypeAdapter(CompletionRequest),
    "embeddings": TypeAdapter(EmbeddingRequest),
}


def check_size(content_length: int | None, limits: Limits) -> None:
    if content_length is not None and content_length > limits.max_body_bytes:
        raise too_large(limits)


def too_large(limits: Limits) -> ApiError:
    return ApiError(
        413,
        f"request body is larger than {limits.max_body_bytes} bytes",
        "invalid_request_error",
        "request_too_large",
    )


def parse_body(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except (ValueError, RecursionError) as e:
        raise bad_request(f"request body is not valid JSON: {e}", "invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request("request body must be a JSON object", "invalid_json")
    try:
        # What cannot be rendered again cannot be forwarded: refused here, not half-way.
        orjson.dumps(body)
    except (TypeError, ValueError) as e:
        raise bad_request(f"request body cannot be forwarded: {e}", "invalid_json") from None
    return body


def _first_error(e: ValidationError) -> ApiError:
    err = e.errors(include_url=False)[0]
    param = ".".join(str(p) for p in err["loc"]) or None
    where = f"{param}: " if param else ""
    return bad_request(f"{where}{err['msg']}", "invalid_value", param)


def validate(kind: Kind, body: Mapping[str, Any], limits: Limits) -> None:
    """Raise an OpenAI-shaped 400 naming the first wrong field, or 413 for too much of something."""
    try:
        _SHAPES[kind].validate_python(body)
    except ValidationError as e:
        raise _first_error(e) from None
    if kind == "chat" and len(body["messages"]) > limits.max_messages:
        raise ApiError(
            413,
            f"messages: {len(body['messages'])} messages is more than the limit of {limits.max_messages}",
            "invalid_request_error",
            "too_many_messages",
            param="messages",
        )
    if kind == "embeddings":
        _check_inputs(body["input"], limits)
        return
    for field in ("max_tokens", "max_completion_tokens"):
        value = body.get(field)
        if isinstance(value, int) and value > limits.max_output_tokens:
            raise bad_request(
                f"{field}: {value} is more than the limit of {limits.max_output_tokens}", "invalid_value", field
            )
    n = body.get("n")
    if isinstance(n, int) and n > limits.max_choices:
        raise bad_request(f"n: {n} is more than the limit of {limits.max_choices}", "invalid_value", "n")


def _check_inputs(inputs: Any, limits: Limits) -> None:
    if not isinstance(inputs, list):
        return
    if not inputs:
        raise bad_request("input: must not be empty", "invalid_value", "input")
    if len(inputs) > limits.max_inputs:
        raise bad_request(
            f"input: {len(inputs)} items is more than the limit of {limits.max_inputs}", "invalid_value", "input"
        )


class ValidateStage:
    name = "validate"

    def __init__(self, limits: Limits) -> None:
        self.limits = limits

    async def enter(self, x: Exchange) -> Reply | None:
        x.body = parse_body(x.raw)
        validate(x.kind, x.body, self.limits)
        return None

    async def leave(self, x: Exchange) -> None:
        return None


def build(runtime: Runtime, state: SharedState) -> ValidateStage:
    return ValidateStage(state.config.limits)
