"""Stop strings held back across token boundaries, on top of UTF-8 safe deltas."""

from __future__ import annotations

from service.engine.output import TextAssembler
from tests.engine.engine_testlib import ByteDetokenizer


def feed(stop: list[str], text: str) -> tuple[list[str], str | None, str]:
    asm = TextAssembler(ByteDetokenizer(True), stop)
    deltas = []
    for b in text.encode():
        delta, matched = asm.push(b)
        deltas.append(delta)
        if matched is not None:
            return deltas, matched, ""
    tail, matched = asm.flush()
    return deltas, matched, tail


def test_stop_string_split_across_tokens_is_never_emitted() -> None:
    deltas, matched, _ = feed(["END"], "abcENDxyz")
    assert matched == "END"
    assert "".join(deltas) == "abc"
    assert deltas[3:5] == ["", ""]  # "E" and "EN" were held back


def test_false_start_is_released() -> None:
    deltas, matched, tail = feed(["END"], "aENx")
    assert matched is None
    assert "".join(deltas) + tail == "aENx"
    assert deltas == ["a", "", "", "ENx"]


def test_partial_stop_at_the_end_is_flushed() -> None:
    deltas, matched, tail = feed(["END"], "abEN")
    assert matched is None and "".join(deltas) == "ab" and tail == "EN"


def test_earliest_of_several_stops_wins() -> None:
    deltas, matched, _ = feed(["zz", "b c"], "ab cdzz")
    assert matched == "b c" and "".join(deltas) == "a"


def test_multibyte_character_split_across_tokens() -> None:
    deltas, matched, tail = feed([], "h€!")
    assert deltas == ["h", "", "", "€", "!"]  # the three bytes of € come out together
    assert matched is None and tail == ""


def test_stop_string_with_multibyte_characters() -> None:
    deltas, matched, _ = feed(["€!"], "a€b€!c")
    assert matched == "€!" and "".join(deltas) == "a€b"
