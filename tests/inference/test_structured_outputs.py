"""Structured outputs force a random model's output into the constraint: json_schema outputs validate (and
finish by the grammar, not by length) at temperature 1, json_object parses, regex, choice and grammar are
honoured, through response_format and vLLM's fields; a schema that does not compile and two constraints
are 400s naming the field; grammar rows draft no MTP token and leave other rows untouched; under a
reasoning parser the grammar applies after </think>."""

import json
import re
import shutil
from types import SimpleNamespace

import httpx
import pytest

from fewchips.inference.engine import Engine, Request
from fewchips.inference.grammar import Grammar, allowed_mask
from fewchips.inference.openai_api import ChatBody
from fewchips.inference.sampling import SamplingParams
from fewchips.inference.server import compile_constraint
from fewchips.inference.tokenizer import Tokenizer

from inference_utils import save_tiny_model_dir, tiny_model, tiny_tokenizer
from test_server import NAME, Served, serving

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["ok", "n", "color", "name"],
          "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 99},
                         "color": {"enum": ["red", "green", "blue"]}, "name": {"type": "string", "maxLength": 8}}}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True}}
# JSON without whitespace between tokens (vLLM's option): a random model given any whitespace spends ~half its
# tokens on it, which max_len 128 cannot hold (the engine test below checks the default, any whitespace)
COMPACT = {"structured_outputs": {"disable_any_whitespace": True}}
CHAT = [{"role": "user", "content": "describe a thing"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("model") / "m")


@pytest.fixture(scope="module")
def served(model_dir):
    yield from serving(model_dir)


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0)


def think_tokenizer() -> Tokenizer:
    from tokenizers import AddedToken
    t = tiny_tokenizer()
    t.add_tokens([AddedToken("<think>", special=False), AddedToken("</think>", special=False)])
    return Tokenizer(t, {"eos_token": "<eos>"})


# ---- through the openai client ------------------------------------------------------------------

def test_json_schema_outputs_validate_at_temperature_1(client):
    for seed in range(3):
        r = client.chat.completions.create(model=NAME, messages=CHAT, temperature=1.0, seed=seed, n=3,
                                           max_tokens=110, response_format=RESPONSE_FORMAT, extra_body=COMPACT)
        for c in r.choices:
            assert c.finish_reason == "stop", c.message.content      # ended by the grammar, not by length
            jsonschema.validate(json.loads(c.message.content), SCHEMA)
    for key, body in (("guided_json", {"guided_json": SCHEMA, **COMPACT}),
                      ("structured_outputs", {"structured_outputs": {"json": json.dumps(SCHEMA),
                                                                     "disable_any_whitespace": True}})):
        r = client.completions.create(model=NAME, prompt="a thing:", temperature=1.0, seed=7, n=2, max_tokens=110,
                                      extra_body=body)
        for c in r.choices:
            assert c.finish_reason == "stop", (key, c.text)
            jsonschema.validate(json.loads(c.text), SCHEMA)


def test_json_object_parses(served, client):
    # any object is unbounded: a bias towards '"' and '}' keeps a random model's objects short (validity: the grammar)
    bias = {str(served.tok.encode(t, add_special_tokens=False)[0]): 3 for t in ('"', "}")}
    r = client.chat.completions.create(model=NAME, messages=CHAT, temperature=1.0, seed=3, n=8, max_tokens=110,
                                       response_format={"type": "json_object"}, logit_bias=bias, extra_body=COMPACT)
    assert all(c.finish_reason == "stop" for c in r.choices), [c.message.content for c in r.choices]
    assert all(isinstance(json.loads(c.message.content), dict) for c in r.choices)
    assert len({c.message.content for c in r.choices}) > 2
    compact = client.completions.create(model=NAME, prompt="x", temperature=0, max_tokens=20, extra_body={
        "structured_outputs": {"json_object": True, "disable_any_whitespace": True}})
    assert json.loads(compact.choices[0].text) == {} and compact.choices[0].finish_reason == "stop"


def test_regex_choice_and_grammar_are_honoured(client):
    pattern = r"[a-c]{2,5}-\d{1,3}"
    for body in ({"guided_regex": pattern}, {"structured_outputs": {"regex": pattern}}):
        r = client.completions.create(model=NAME, prompt="code:", temperature=1.0, seed=1, n=4, max_tokens=20,
                                      extra_body=body)
        assert all(re.fullmatch(pattern, c.text) for c in r.choices), [c.text for c in r.choices]
    choices = ["yes", "no", "maybe not"]
    for body in ({"guided_choice": choices}, {"structured_outputs": {"choice": choices}}):
        r = client.chat.completions.create(model=NAME, messages=CHAT, temperature=1.0, seed=2, n=4, max_tokens=10,
                                           extra_body=body)
        assert all(c.message.content in choices and c.finish_reason == "stop" for c in r.choices)
    lark = 'start: "(" item ("," item)* ")"\nitem: /[0-9]/ | "x"'
    r = client.completions.create(model=NAME, prompt="tuple:", temperature=1.0, seed=4, n=4, max_tokens=30,
                                  extra_body={"guided_grammar": lark})
    for c in r.choices:
        assert re.fullmatch(r"\(([0-9x])(,[0-9x])*\)", c.text) or c.finish_reason == "length", c.text


def test_stream_equals_non_stream(client):
    kw = dict(model=NAME, messages=CHAT, temperature=0, max_tokens=110, response_format=RESPONSE_FORMAT,
              extra_body=COMPACT)
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(full.choices[0].message.content), SCHEMA)
    kw = dict(model=NAME, prompt="x", temperature=0, max_tokens=20, extra_body={"guided_regex": r"[0-9]{3}"})
    text = "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True) if c.choices)
    assert text == client.completions.create(**kw).choices[0].text and re.fullmatch("[0-9]{3}", text)


BAD = [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}},
     "response_format", "objectx"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "strict": True,
                                                                 "schema": {"not": {"type": "integer"}}}}},
     "response_format", "Unimplemented"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format", "schema"),
    ({"response_format": {"type": "xml"}}, "response_format", "xml"),
    ({"guided_json": "{not json"}, "guided_json", "JSON"),
    ({"guided_regex": "(ab"}, "guided_regex", "unclosed group"),
    ({"guided_choice": []}, "guided_choice", "choice"),
    ({"guided_grammar": "start: undefined_rule"}, "guided_grammar", "undefined_rule"),
    ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs", "structural_tag"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a+"}, "guided_regex", "one output constraint"),
    ({"structured_outputs": {"json": SCHEMA, "regex": "a+"}}, "structured_outputs", "one output constraint"),
]


@pytest.mark.parametrize("body,param,says", BAD, ids=[f"{p}-{i}" for i, (_, p, _) in enumerate(BAD)])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_bad_constraints_are_400_naming_the_field(served, body, param, says, path):
    ask = {"prompt": "hi"} if path == "/v1/completions" else {"messages": CHAT}
    r = httpx.post(served.url + path, json={**ask, **body, "max_tokens": 4})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and says in err["message"], err


def test_strict_false_drops_what_cannot_be_enforced(served):
    schema = {"type": "string", "maxLength": 3, "not": {"const": "a"}}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": False}}
    r = httpx.post(served.url + "/v1/chat/completions", json={"messages": CHAT, "response_format": fmt,
                                                              "max_tokens": 10, "temperature": 0})
    assert r.status_code == 200, r.text
    assert len(json.loads(r.json()["choices"][0]["message"]["content"])) <= 3


# ---- the engine ------------------------------------------------------------------------------------

def test_mask_covers_the_model_vocab_and_grammar_rows_leave_others_untouched():
    tok = Tokenizer(tiny_tokenizer(), {"eos_token": "<eos>"})                 # 300 tokens, the model has 320
    g = Grammar("json_schema", SCHEMA, tok, 320, [2])
    allowed = allowed_mask([g.start()], 320, "cpu")
    assert allowed.shape == (1, 320) and allowed[0].sum() == 1 and tok.decode([int(allowed[0].nonzero())]) == "{"
    allowed = allowed_mask([Grammar("regex", r"(.|\n)*", tok, 320, [2]).start()], 320, "cpu")
    assert allowed[0, :300].sum() > 200 and not allowed[0, 300:].any()       # ids past the tokenizer's: never
    model = tiny_model()
    for spec in (None, "mtp"):
        engine = Engine(model, tok, max_batch=4, max_len=256, speculative=spec)
        alone = engine.run([Request(tok.encode("hello world"), SamplingParams(max_tokens=30))])[0]
        plain = Request(tok.encode("hello world"), SamplingParams(max_tokens=30))
        ruled = [Request(tok.encode("hello world"), SamplingParams(max_tokens=230, temperature=1.0, seed=s),
                         grammar=g.start()) for s in range(3)]
        engine.run([plain, *ruled])
        assert plain.output_ids == alone.output_ids                         # the grammar rows changed nothing
        for r in ruled:
            assert r.finish_reason == "stop" and r.drafted == 0
            jsonschema.validate(json.loads(tok.decode(r.output_ids)), SCHEMA)
        assert spec is None or plain.drafted > 0


def test_grammar_applies_after_think_end():
    """The runner masks a grammar row only once </think> has been sampled: a token the grammar forbids goes
    through before it, not after."""
    tok = think_tokenizer()
    end = tok.encode("</think>", add_special_tokens=False)[0]
    forbidden = tok.encode("hello", add_special_tokens=False)[0]
    g = Grammar("choice", ["yes", "no"], tok, 320, [2])
    g.after = end
    engine = Engine(tiny_model(), tok, max_batch=2, max_len=100)
    r = engine.add(Request(tok.encode("q"), SamplingParams(max_tokens=20, logit_bias={forbidden: 100.0}),
                           grammar=g.start()))
    engine.step()
    engine.step()
    assert r.output_ids == [forbidden, forbidden] and not r.grammar.active        # reasoning: not constrained
    r.params.logit_bias = {end: 100.0, forbidden: 50.0}
    while r.finish_reason is None:
        engine.step()
    assert r.output_ids[2] == end and r.finish_reason == "stop"
    assert tok.decode(r.output_ids[3:]) in ("yes", "no")                          # forbidden: masked after


def test_server_reasoning_applies_the_grammar_after_think_end(model_dir, tmp_path):
    """Chat with the reasoning parser: the answer after </think> obeys the constraint; a prompt that closed
    the reasoning already constrains from the first token; a tokenizer without a </think> token is a 400."""
    tok = think_tokenizer()
    path = tmp_path / "m"
    shutil.copytree(model_dir, path)
    tok.tok.save(str(path / "tokenizer.json"))
    end = tok.encode("</think>", add_special_tokens=False)[0]
    s = Served(str(path), reasoning=True)
    try:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        r = c.chat.completions.create(model=NAME, messages=CHAT, temperature=0, max_tokens=20,
                                      logit_bias={str(end): 100}, extra_body={"guided_choice": ["yes", "no"]})
        m = r.choices[0].message
        assert m.reasoning_content == "" and m.content in ("yes", "no") and r.choices[0].finish_reason == "stop"
    finally:
        s.close()
    body = ChatBody.model_validate({"messages": CHAT, "guided_regex": "a+"})
    state = SimpleNamespace(reasoning=True, tokenizer=tok, stop_ids=[2],
                            engine=SimpleNamespace(model=SimpleNamespace(config=SimpleNamespace(vocab_size=320))))
    think = tok.encode("<think>", add_special_tokens=False)
    assert compile_constraint(body, state, [5, 6, *think]).after == end       # R1's template opens <think>
    assert compile_constraint(body, state, [5, *think, 7, end]).after is None  # V3.1 non-thinking closes it
    state.tokenizer = Tokenizer(tiny_tokenizer(), {"eos_token": "<eos>"})
    with pytest.raises(Exception, match="</think>"):
        compile_constraint(body, state, [5, 6])
