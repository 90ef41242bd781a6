"""SSE framing and OpenAI chunk classification."""

import json

from bench.sse import SSEParser, classify


def feed_all(parser: SSEParser, pieces: list[str]) -> list[str]:
    out: list[str] = []
    for piece in pieces:
        out.extend(parser.feed(piece))
    return out


def test_events_split_across_arbitrary_chunks():
    stream = 'data: {"a": 1}\n\ndata: {"b": 2}\n\ndata: [DONE]\n\n'
    for cut in range(1, len(stream)):
        events = feed_all(SSEParser(), [stream[:cut], stream[cut:]])
        assert events == ['{"a": 1}', '{"b": 2}', "[DONE]"], cut


def test_one_character_at_a_time():
    stream = "data: x\n\ndata: y\n\n"
    assert feed_all(SSEParser(), list(stream)) == ["x", "y"]


def test_crlf_and_cr_line_endings_including_a_split_crlf():
    assert SSEParser().feed("data: a\r\n\r\ndata: b\r\rdata: c\n\n") == ["a", "b", "c"]
    # CR at the end of one chunk and LF at the start of the next are one line break.
    assert feed_all(SSEParser(), ["data: a\r", "\n\r", "\n"]) == ["a"]


def test_comments_and_other_fields_are_ignored_and_multiline_data_joins():
    stream = ": ping\n\nevent: message\nid: 7\ndata: line1\ndata:line2\n\n"
    assert SSEParser().feed(stream) == ["line1\nline2"]


def test_incomplete_event_is_held_back():
    p = SSEParser()
    assert p.feed("data: partial") == []
    assert p.feed("\n") == []
    assert p.feed("\n") == ["partial"]


def test_classify_content_usage_done_error():
    content = classify(json.dumps({"choices": [{"index": 0, "text": "hi"}]}))
    assert (content.kind, content.text) == ("content", "hi")
    empty_text = classify(json.dumps({"choices": [{"index": 0, "text": ""}]}))
    assert empty_text.kind == "content"  # vLLM counts it: TTFT may be an empty chunk
    chat = classify(json.dumps({"choices": [{"delta": {"content": "yo"}}]}))
    assert (chat.kind, chat.text) == ("content", "yo")
    usage = classify(json.dumps({"choices": [], "usage": {"completion_tokens": 5}}))
    assert usage.kind == "usage" and usage.usage == {"completion_tokens": 5}
    assert classify("[DONE]").kind == "done"
    err = classify(json.dumps({"error": {"message": "too long", "type": "invalid_request"}}))
    assert (err.kind, err.error) == ("error", "too long")
    assert classify("{not json").kind == "error"
    assert classify(json.dumps({"object": "ping"})).kind == "other"
