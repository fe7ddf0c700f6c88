"""Stop strings and incremental text (runtime/serving/text.py), without a server: every front end uses this."""

from __future__ import annotations

from trimode.runtime.serving.text import TextAssembler

PIECES = {1: "he", 2: "llo", 3: " wo", 4: "r", 5: "ld", 6: "!", 7: "\n\n", 8: "#"}


def decode(ids: list[int]) -> str:
    return "".join(PIECES[i] for i in ids)


def test_a_stop_string_spanning_two_tokens_is_held_back_then_cut():
    text = TextAssembler(decode, stop=["world"])
    assert text.add(1) + text.add(2) == "hello"
    assert text.add(3) == " "  # "wo" may begin the stop string: held back
    assert text.add(4) == ""  # "wor" still may
    assert text.add(5) == ""  # "world" completed by the third token: cut right before it
    assert text.finished and text.stopped_by == "world" and text.final_text == "hello "
    assert text.tokens_used == 5  # usage counts up to and including the token that completed the stop
    assert text.add(6) == ""  # nothing after a stop


def test_a_held_back_prefix_that_does_not_complete_is_released():
    text = TextAssembler(decode, stop=["world"])
    pieces = [text.add(t) for t in (1, 2, 3, 6)]
    assert pieces[2] == " " and pieces[3] == "wo!"  # "wo!" can no longer become "world"
    assert not text.finished and text.finish([1, 2, 3, 6]) == "" and text.final_text == "hello wo!"


def test_the_stop_that_ends_first_wins():
    text = TextAssembler(decode, stop=["#", "\n\n#"])
    assert text.add_many([1, 7, 8, 2]) == "he"
    assert text.stopped_by == "\n\n#" and text.final_text == "he"  # both end at the same character: earlier start
