"""The denylist on input (400 ``content_filter``) and on output (``finish_reason:
"content_filter"``), with a greedy (temperature 0) answer whose words we first observe
on a server without the filter."""

from __future__ import annotations

import re

from llmis.config import FilterSettings
from llmis.ops.contentfilter import ContentFilter, ContentFilterError
from tests.conftest import OPS_USER_KEY, RunningServer
from tests.ops_helpers import FRANCE, finish_reasons, post, stream_chat, stream_text

CHAT = "/v1/chat/completions"
FRANCE_BODY = {"model": "smollm2", "messages": FRANCE, "max_tokens": 16, "temperature": 0}


async def test_prompt_denylist(ops_server: RunningServer) -> None:
    for content in ("Tell me about the FORBIDDENWORD.", "my code is secret-1234"):
        body = {**FRANCE_BODY, "messages": [{"role": "user", "content": content}]}
        status, reply, _ = await post(ops_server, CHAT, body, OPS_USER_KEY)
        assert status == 400, reply
        assert reply["error"]["code"] == "content_filter"
        assert reply["error"]["param"] == "messages"
    completion = {"model": "smollm2", "prompt": "secret-9 is", "max_tokens": 1}
    status, reply, _ = await post(ops_server, "/v1/completions", completion, OPS_USER_KEY)
    assert status == 400 and reply["error"]["code"] == "content_filter"
    assert reply["error"]["param"] == "prompt"
    # whole words only: "forbiddenwords" and "Nationals" are fine
    ok = {**FRANCE_BODY, "max_tokens": 1, "messages": [{"role": "user", "content": "Nationals"}]}
    assert (await post(ops_server, CHAT, ok, OPS_USER_KEY))[0] == 200


# words of the greedy answer to FRANCE (which one depends on the CPU's kernels), on the
# ops server's denylist
ANSWER_WORDS = ("Nation", "Marseillaise")


async def test_output_denylist(server: RunningServer, ops_server: RunningServer) -> None:
    # without the filter, this greedy answer says one of ANSWER_WORDS
    status, plain, _ = await post(server, CHAT, FRANCE_BODY)
    assert status == 200
    unfiltered = plain["choices"][0]["message"]["content"]
    found = [m.start() for w in ANSWER_WORDS if (m := re.search(rf"\b{w}\b", unfiltered))]
    assert found, unfiltered
    before_match = unfiltered[: min(found)]

    status, body, _ = await post(ops_server, CHAT, FRANCE_BODY, OPS_USER_KEY)
    assert status == 200
    choice = body["choices"][0]
    assert choice["finish_reason"] == "content_filter"
    assert choice["message"]["content"] == before_match

    status, payloads = await stream_chat(ops_server, {**FRANCE_BODY, "stream": True}, OPS_USER_KEY)
    assert status == 200
    assert finish_reasons(payloads) == ["content_filter"]
    assert stream_text(payloads) == before_match


def test_output_scanner_catches_split_matches() -> None:
    cf = ContentFilter(
        FilterSettings(keywords=("bad word",), patterns=(r"\d{4}",), holdback_chars=8)
    )
    scanner = cf.scanner()
    sent = [scanner.feed(p) for p in ("This is fine and ", "then a ba", "d wo", "rd here")]
    assert scanner.tripped
    assert "".join(sent) == "This is fine and then a "
    scanner = cf.scanner()
    assert scanner.feed("pin 12") == ""  # held back
    assert scanner.feed("34!") == "pin "
    assert scanner.tripped and scanner.feed("more") == ""
    scanner = cf.scanner()
    assert scanner.feed("all clear, ") + scanner.feed("really", final=True) == "all clear, really"
    assert not scanner.tripped
    assert not ContentFilter(FilterSettings()).enabled
    try:
        cf.check_prompt(["say BAD  WORD", "a BAD WORD"], "messages")
    except ContentFilterError as exc:
        assert exc.status == 400 and exc.code == "content_filter"
    else:
        raise AssertionError("the prompt was not rejected")
