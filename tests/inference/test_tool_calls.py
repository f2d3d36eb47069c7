"""DeepSeek-V3's tool-call format read back from a model's output ids: the whole message and the
streamed deltas (accumulated as the openai client and agent frameworks do) give the same calls."""

import json

import pytest

from fewchips.inference.tokenizer import Tokenizer
from fewchips.inference.tool_calls import (CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, SEP, ToolCallStream,
                                           marker_ids, parse_call, renders_tool_calls)
from fewchips.train.tokenizer import EOS, TOOL_CHAT_TEMPLATE, train_tokenizer


@pytest.fixture(scope="module")
def tok():
    t = train_tokenizer(['{"city": "Paris"} get_weather sunny\n' * 20, "Sure, let me check.\n" * 10], 320)
    return Tokenizer(t, {"eos_token": EOS})


def call(name, args):
    return f"{CALL_BEGIN}function{SEP}{name}\n```json\n{args}\n```{CALL_END}"


OUTPUTS = [
    ("Sure, let me check." + CALLS_BEGIN + call("get_weather", '{"city": "Paris"}') + CALLS_END + EOS,
     "Sure, let me check.", [("get_weather", '{"city": "Paris"}')]),
    (CALLS_BEGIN + call("get_weather", '{"city": "Paris"}') + "\n" + call("get_time", "{}") + CALLS_END + EOS,
     None, [("get_weather", '{"city": "Paris"}'), ("get_time", "{}")]),
    ("no tools here" + EOS, "no tools here", []),
    (CALLS_BEGIN + CALL_BEGIN + "function" + SEP + "get_weather\n```json\n{\"ci", None, [("get_weather", '{"ci')]),
]


@pytest.mark.parametrize("k", range(len(OUTPUTS)))
def test_whole_and_streamed_tool_calls_agree(tok, k):
    text, content, calls = OUTPUTS[k]
    ids = tok.encode(text, add_special_tokens=False)
    markers = marker_ids(tok)
    whole = ToolCallStream(tok, markers, [])
    whole.push(ids)
    whole.flush()
    got_content, got_calls = whole.text
    assert got_content == content
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in got_calls] == calls
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in got_calls)

    stream = ToolCallStream(tok, markers, [])
    text_parts, acc = [], {}
    for t in ids + [None]:
        c, deltas = stream.push([t]) if t is not None else stream.flush()
        text_parts.append(c)
        for d in deltas:                          # how the openai client's users accumulate them
            slot = acc.setdefault(d["index"], {"name": "", "arguments": "", "id": None})
            slot["id"] = d.get("id") or slot["id"]
            slot["name"] += d.get("function", {}).get("name") or ""
            slot["arguments"] += d.get("function", {}).get("arguments") or ""
    assert "".join(text_parts) == (content or "")
    assert [(acc[i]["name"], acc[i]["arguments"]) for i in sorted(acc)] == calls
    assert [acc[i]["id"] for i in sorted(acc)] == [c["id"] for c in stream.text[1]]


def test_parse_call_and_template_detection():
    assert parse_call('f\n```json\n{"a": 1}\n```') == ("f", '{"a": 1}')
    assert parse_call("f\n{}") == ("f", "{}")
    assert renders_tool_calls(TOOL_CHAT_TEMPLATE) and not renders_tool_calls("{{ messages }}")
    assert json.loads(parse_call('g\n```json\n{"x": [1, 2]}\n```')[1]) == {"x": [1, 2]}
