"""README's "First request in two minutes", as a new user runs it: the example policy folder in
front of the fake provider, a real `tierwise gateway` process, the openai SDK. Only the port of
the fake provider differs (the example names 9001; a test takes a free one)."""

from __future__ import annotations

import re
from pathlib import Path

import openai

from tests.conftest import Launch, Net

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "first-request"


def _section() -> str:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("## First request in two minutes")
    return readme[start : readme.index("\n## ", start + 1)]


def test_the_readme_runs_the_example_folder_against_the_fake_provider() -> None:
    section = _section()
    assert "tierwise gateway --policy examples/first-request --port 8080" in section
    assert "tierwise_sidecar.fake_backend --port 9001" in section
    assert "http://127.0.0.1:9001/v1" in (EXAMPLE / "tiers.yaml").read_text()


def test_the_first_request_is_answered_with_what_tierwise_did(net: Net, launch: Launch, tmp_path: Path) -> None:
    fake = net.fake("first-request")
    folder = tmp_path / "first-request"
    folder.mkdir()
    text = (EXAMPLE / "tiers.yaml").read_text().replace("http://127.0.0.1:9001/v1", fake.v1)
    (folder / "tiers.yaml").write_text(text)
    _, url = launch("gateway", "--policy", str(folder))
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.with_raw_response.create(
        model="premium", messages=[{"role": "user", "content": "Say hello."}]
    )
    assert reply.headers["x-tierwise-tier"] == "premium" and reply.headers["x-tierwise-model"] == "gpt-4o"
    assert re.fullmatch(r"0\.\d{8}", reply.headers["x-tierwise-cost-usd"])
    assert reply.parse().choices[0].message.content
    # A burst of ten to `standard` (a bucket of 5, refilled at 5/s): past it, the rate limit answers
    # as the README says (ten one after the other take well under a second here).
    codes = []
    for _ in range(10):
        try:
            client.chat.completions.create(model="standard", messages=[{"role": "user", "content": "Hi."}])
            codes.append("ok")
        except openai.RateLimitError as e:
            assert e.code == "rate_limit_exceeded" and e.response.headers["retry-after"]
            codes.append("429")
    assert "429" in codes, codes
