"""Tool calling through the `openai` client, as vLLM's deepseek_v3 parser serves it: a conversation with
tools, a tool call and a tool result becomes exactly transformers' ids; tool_choice required and a named
function return calls whose arguments satisfy their schemas at temperature 1 (constrained decoding),
plain and streamed, with finish_reason "tool_calls"; and the OpenAI Agents SDK completes a tool round
trip against the server."""

import json
from typing import Literal

import pytest

from fewchips.train.tokenizer import save_tokenizer, train_tokenizer

from inference_utils import save_tiny_model_dir
from test_server import NAME, serving

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
        "required": ["zone"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "forecast", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "clock", "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
HISTORY = [{"role": "user", "content": "Weather in Paris?"},
           {"role": "assistant", "content": None, "tool_calls": [
               {"id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 1}'}}]},
           {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
           {"role": "assistant", "content": "21 degrees."},
           {"role": "user", "content": "And the time?"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny model whose tokenizer (trained by fewchips) holds V3's tool tokens and writes its tool template."""
    d = save_tiny_model_dir(tmp_path_factory.mktemp("model") / "m", max_position_embeddings=2048)
    text = ['{"city": "Paris", "days": 3} get_weather get_time {"zone": "UTC"}\n' * 20, "the weather is fine\n" * 9]
    save_tokenizer(train_tokenizer(text, 320), d, 256)
    return d


@pytest.fixture(scope="module")
def served(model_dir):
    yield from serving(model_dir, tool_parser=True, max_len=1536)        # the tools' schemas fill ~800 tokens


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0)


def test_a_tool_conversation_is_exactly_transformers_ids(served, model_dir, client):
    import httpx
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    want = hf.apply_chat_template(HISTORY, tools=TOOLS, add_generation_prompt=True, tokenize=True)
    want = list(want["input_ids"] if hasattr(want, "keys") else want)
    got = httpx.post(served.url + "/tokenize", json={"messages": HISTORY, "tools": TOOLS}).json()["tokens"]
    assert got == want
    r = client.chat.completions.create(model=NAME, messages=HISTORY, tools=TOOLS, max_tokens=4, temperature=0)
    assert r.usage.prompt_tokens == len(want)


def check_calls(calls, names):
    assert calls and {c.function.name for c in calls} <= set(names)
    for c in calls:
        jsonschema.validate(json.loads(c.function.arguments), SCHEMAS[c.function.name])
        assert c.type == "function" and c.id.startswith("call_")


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}],
                         ids=["required", "named"])
def test_required_and_named_tool_choices_give_valid_calls(client, choice):
    names = ["get_weather", "get_time"] if choice == "required" else ["get_time"]
    for seed in range(4):
        r = client.chat.completions.create(model=NAME, messages=HISTORY[:1], tools=TOOLS, tool_choice=choice,
                                           max_tokens=120, temperature=1.0, seed=seed, parallel_tool_calls=False)
        choice0 = r.choices[0]
        assert choice0.finish_reason == "tool_calls", choice0
        check_calls(choice0.message.tool_calls, names)
        assert len(choice0.message.tool_calls) == 1 and not choice0.message.content


def test_streamed_tool_calls_accumulate_to_the_plain_ones(client):
    kw = dict(model=NAME, messages=HISTORY[:1], tools=TOOLS, tool_choice="required", max_tokens=120, temperature=0)
    plain = client.chat.completions.create(**kw).choices[0]
    acc, finish = {}, None
    for ch in client.chat.completions.create(**kw, stream=True):
        if not ch.choices:
            continue
        d = ch.choices[0].delta
        for t in d.tool_calls or []:
            slot = acc.setdefault(t.index, {"name": "", "arguments": "", "id": None})
            slot["id"] = t.id or slot["id"]
            slot["name"] += (t.function.name or "") if t.function else ""
            slot["arguments"] += (t.function.arguments or "") if t.function else ""
        finish = ch.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert [(acc[i]["name"], acc[i]["arguments"]) for i in sorted(acc)] == \
        [(c.function.name, c.function.arguments) for c in plain.message.tool_calls]


def test_tools_refused_where_they_cannot_be_honoured(served, client):
    with pytest.raises(openai.BadRequestError, match="not among the tools"):
        client.chat.completions.create(model=NAME, messages=HISTORY[:1], tools=TOOLS, max_tokens=2,
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    with pytest.raises(openai.BadRequestError, match="not among the tools"):          # malformed: a 400, not a 500
        client.chat.completions.create(model=NAME, messages=HISTORY[:1], tools=TOOLS, max_tokens=2,
                                       tool_choice={"type": "function", "function": "get_time"})
    with pytest.raises(openai.BadRequestError, match="output constraint"):
        client.chat.completions.create(model=NAME, messages=HISTORY[:1], tools=TOOLS, tool_choice="required",
                                       response_format={"type": "json_object"}, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="tools"):
        client.completions.create(model=NAME, prompt="hi", max_tokens=2, extra_body={"tools": TOOLS})


def test_the_openai_agents_sdk_completes_a_tool_round_trip(served):
    agents = pytest.importorskip("agents")
    agents.set_tracing_disabled(True)
    seen = []

    @agents.function_tool
    def get_weather(city: Literal["Paris", "Rome"], days: Literal[1, 2, 3]) -> str:   # bounded: a random model
        """The forecast for a city."""
        seen.append((city, days))
        return f"sunny in {city} for {days} days"

    model = agents.OpenAIChatCompletionsModel(
        model=NAME, openai_client=openai.AsyncOpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0))
    agent = agents.Agent(name="forecaster", instructions="Use the tool.", tools=[get_weather], model=model,
                         model_settings=agents.ModelSettings(tool_choice="required", max_tokens=200, temperature=0.7))
    result = agents.Runner.run_sync(agent, "Weather in Paris?", max_turns=4)
    assert seen and seen[0][0] in ("Paris", "Rome") and seen[0][1] in (1, 2, 3)    # the SDK parsed our call
    calls = [i for i in result.new_items if i.type == "tool_call_item"]
    outputs = [i for i in result.new_items if i.type == "tool_call_output_item"]
    assert calls and outputs and outputs[0].output.startswith("sunny in")
    assert isinstance(result.final_output, str)                                     # then a reply after the result


def test_reasoning_then_tool_calls_in_one_reply(model_dir):
    """Both parsers on (an R1-style model with tools): the text before </think> is reasoning_content, the
    calls after it are parsed, and tool_choice required applies after </think>."""
    with_both = serving(model_dir, tool_parser=True, reasoning=True, max_len=1536)
    s = next(with_both)
    try:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        end = s.tok.tok.token_to_id("</think>")
        kw = dict(model=NAME, messages=HISTORY[:1], tools=TOOLS, tool_choice="required", max_tokens=120,
                  temperature=0, logit_bias={str(end): 100})           # think for no token, then call
        r = c.chat.completions.create(**kw).choices[0]
        assert r.finish_reason == "tool_calls" and r.message.reasoning_content == ""
        check_calls(r.message.tool_calls, ["get_weather", "get_time"])
        streamed = [ch.choices[0] for ch in c.chat.completions.create(**kw, stream=True) if ch.choices]
        names = "".join(t.function.name or "" for ch in streamed for t in ch.delta.tool_calls or [] if t.function)
        assert names == "".join(t.function.name for t in r.message.tool_calls)
        assert streamed[-1].finish_reason == "tool_calls"
    finally:
        next(with_both, None)
