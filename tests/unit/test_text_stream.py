"""Detokenization and stop strings of the batched llama.cpp engine (no llama.cpp needed)."""

from deployments.engines.text_stream import TextStream


def run(pieces: list[bytes], stops: tuple[str, ...] = ()) -> tuple[list[str], str, bool]:
    stream = TextStream(stops)
    out = [stream.push(p) for p in pieces]
    return out, stream.flush(), stream.stopped


def test_multi_byte_characters_are_never_split() -> None:
    snowman = "☃".encode()  # 3 bytes, one per token
    out, rest, _ = run([b"a", snowman[:1], snowman[1:2], snowman[2:], b"b"])
    assert out == ["a", "", "", "☃", "b"] and rest == ""


def test_a_stop_string_spanning_tokens_is_cut_and_never_sent() -> None:
    out, rest, stopped = run([b"Hello ", b"wor", b"ld END", b"ING more"], stops=("END",))
    assert "".join(out) == "Hello world " and stopped and rest == ""


def test_text_that_only_looked_like_a_stop_string_is_sent() -> None:
    out, rest, stopped = run([b"an E", b"N", b"d"], stops=("END",))
    assert out == ["an ", "", "ENd"] and not stopped
    out, rest, stopped = run([b"an E", b"N"], stops=("END",))
    assert "".join(out) == "an " and rest == "EN" and not stopped


def test_the_earliest_of_several_stop_strings_wins() -> None:
    out, _, stopped = run([b"x STOP y END"], stops=("END", "STOP"))
    assert out == ["x "] and stopped


def test_invalid_bytes_become_replacement_characters_not_errors() -> None:
    out, rest, _ = run([b"\xff", b"ok"])
    assert "".join(out) + rest == "\ufffdok"


def test_the_stream_names_the_stop_string_that_ended_it_the_earliest_in_the_text() -> None:
    stream = TextStream(["END", "x"])
    assert stream.push(b"abc") == "abc" and stream.stop is None
    assert stream.push(b"dEND and x") == "d"
    assert stream.stopped and stream.stop == "END"
