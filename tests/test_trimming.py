"""``trim_history``: which turns go when a conversation outgrows the context.

A word counter stands in for the tokenizer here; ``tests/test_ws.py`` and
``tests/test_browser.py`` trim real conversations with SmolLM2's own tokenizer.
"""

from __future__ import annotations

from llmis.serving.protocol import ChatMessage
from llmis.serving.trimming import default_reserve, trim_history


def msg(role: str, words: int, tag: str = "") -> ChatMessage:
    return ChatMessage(role=role, content=" ".join([tag or role] * words))  # type: ignore[arg-type]


def words(messages: list[ChatMessage]) -> int:
    return sum(len(str(m.content).split()) for m in messages)


def conversation() -> list[ChatMessage]:
    return [
        msg("system", 5),
        msg("user", 10, "u1"),
        msg("assistant", 10, "a1"),
        msg("user", 10, "u2"),
        msg("assistant", 10, "a2"),
        msg("tool", 3, "t2"),
        msg("user", 10, "u3"),
        msg("assistant", 10, "a3"),
        msg("user", 4, "u4"),
    ]


def test_a_history_that_fits_is_kept_whole() -> None:
    messages = conversation()
    result = trim_history(messages, words, budget=words(messages))
    assert result.messages == messages
    assert (result.dropped, result.prompt_tokens) == (0, 72)


def test_the_oldest_whole_turns_go_first_and_no_more_than_needed() -> None:
    messages = conversation()
    result = trim_history(messages, words, budget=60)  # dropping turn 1 (20 words) suffices
    assert result.dropped == 2
    assert result.messages == [messages[0], *messages[3:]]
    assert result.prompt_tokens == 52

    result = trim_history(messages, words, budget=45)  # turn 2 goes with its tool message
    assert result.dropped == 5
    assert [str(m.content).split()[0] for m in result.messages] == ["system", "u3", "a3", "u4"]
    assert result.prompt_tokens == 29


def test_the_system_prompt_and_the_newest_message_always_stay() -> None:
    messages = conversation()
    result = trim_history(messages, words, budget=3)  # nothing fits: the smallest history
    assert result.messages == [messages[0], messages[-1]]
    assert result.dropped == 7
    assert result.prompt_tokens == 9


def test_without_a_system_prompt() -> None:
    messages = conversation()[1:]
    result = trim_history(messages, words, budget=30)
    assert [str(m.content).split()[0] for m in result.messages] == ["u3", "a3", "u4"]
    assert result.dropped == 5


def test_a_single_message_is_never_dropped() -> None:
    only = [msg("user", 50)]
    result = trim_history(only, words, budget=10)
    assert result.messages == only and result.dropped == 0


def test_default_reserve() -> None:
    assert default_reserve(2048) == 512
    assert default_reserve(8192) == 512
    assert default_reserve(512) == 128
    assert default_reserve(2) == 1
