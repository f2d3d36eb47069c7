"""Tool use in the chat format: a tokenizer `fewchips train` makes carries DeepSeek-V3's tool-call tokens and
R1's <think>/</think> as special tokens; its chat template renders tools, tool calls and tool results as
V3's does, id for id what `transformers.AutoTokenizer.apply_chat_template(messages, tools=...)` gives;
SFT trains on the assistant's tool calls and not on the tool results."""

import json

import pytest

from fewchips.inference.tokenizer import Tokenizer
from fewchips.train.chat import encode_chat, read_chats
from fewchips.train.tokenizer import (CHAT_TEMPLATE, EOS, SPECIAL_TOKENS, THINK, THINK_END, TOOL_CALLS_BEGIN,
                                      TOOL_TOKENS, save_tokenizer, train_tokenizer)

TEXT = ["def add(a, b):\n    return a + b\n", "the weather in Paris is sunny, 21 degrees. " * 20,
        '{"city": "Paris", "unit": "celsius"}\n' * 10]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather <now> & later",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string"}}, "required": ["city"]}}}]
CALL = {"id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
CHATS = [
    [{"role": "user", "content": "Weather in Paris?"},
     {"role": "assistant", "content": None, "tool_calls": [CALL]},
     {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
     {"role": "assistant", "content": "It is 21 degrees."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Paris and Rome?"},
     {"role": "assistant", "content": "Checking both.", "tool_calls": [
         CALL, {**CALL, "id": "call_2", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
     {"role": "tool", "tool_call_id": "call_1", "content": "21"},
     {"role": "tool", "tool_call_id": "call_2", "content": "25"}],
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    tok = train_tokenizer(TEXT * 5, 320)
    save_tokenizer(tok, str(d))
    return d, tok


def test_a_trained_tokenizer_has_the_tool_and_think_tokens_as_special_tokens(tok_dir):
    _, tok = tok_dir
    added = {t.content: t.special for t in tok.get_added_tokens_decoder().values()}
    assert all(added.get(t) is True for t in [*TOOL_TOKENS, THINK, THINK_END])
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert tok.encode(TOOL_CALLS_BEGIN + "x", add_special_tokens=False).ids[0] == tok.token_to_id(TOOL_CALLS_BEGIN)


@pytest.mark.parametrize("chat", range(len(CHATS)))
@pytest.mark.parametrize("gen", [False, True])
def test_tool_chats_equal_transformers_apply_chat_template_with_tools(tok_dir, chat, gen):
    transformers = pytest.importorskip("transformers")
    d, tok = tok_dir
    hf = transformers.AutoTokenizer.from_pretrained(str(d))
    msgs = CHATS[chat]
    want = hf.apply_chat_template(msgs, tools=TOOLS, add_generation_prompt=gen, tokenize=True)
    want = list(want["input_ids"] if hasattr(want, "keys") else want)
    rows = read_chats_of(d, [{"messages": msgs, "tools": TOOLS}])
    ids, train = encode_chat(tok, rows[0], add_generation_prompt=gen)
    assert ids == want
    assert Tokenizer.from_dir(str(d)).apply_chat_template(msgs, add_generation_prompt=gen, tools=TOOLS) == want
    text = hf.decode(want)
    assert '"description": "Weather <now> & later"' in text          # transformers' tojson, not Jinja's
    assert "<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{\"city\": \"Paris\"}\n```" in text


def read_chats_of(d, rows):
    path = d / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return read_chats(str(path))


def test_sft_trains_the_tool_calls_and_not_the_results(tok_dir):
    d, tok = tok_dir
    ids, train = encode_chat(tok, read_chats_of(d, [{"messages": CHATS[0]}])[0])
    trained = tok.decode([i for i, t in zip(ids, train) if t], skip_special_tokens=False)
    calls = ("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
             '{"city": "Paris"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>' + EOS)
    assert trained == calls + "It is 21 degrees." + EOS
    assert '{"temp": 21}' in tok.decode(ids, skip_special_tokens=False) and '"temp"' not in trained


def test_a_template_that_cannot_write_tool_calls_is_refused(tok_dir):
    from fewchips.inference.tokenizer import ChatTemplate
    from fewchips.train.chat import ChatDataError
    from fewchips.train.tokenizer import BOS
    d, tok = tok_dir
    with pytest.raises(ChatDataError, match="does not write tool calls"):
        encode_chat(tok, read_chats_of(d, [{"messages": CHATS[0]}])[0], template=ChatTemplate(CHAT_TEMPLATE, BOS, EOS))


def test_chats_without_tools_render_as_before(tok_dir):
    from fewchips.inference.tokenizer import ChatTemplate
    from fewchips.train.tokenizer import BOS, TOOL_CHAT_TEMPLATE
    plain = [{"role": "system", "content": "a"}, {"role": "system", "content": "b"},
             {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
             {"role": "user", "content": "x"}]
    for gen in (False, True):
        assert ChatTemplate(TOOL_CHAT_TEMPLATE, BOS, EOS).render(plain, gen) == \
            ChatTemplate(CHAT_TEMPLATE, BOS, EOS).render(plain, gen)
