"""Every request field the server takes is honoured or refused by name: vLLM's sampling fields change
the output as vLLM defines them (through the `openai` client's extra_body, as vLLM users send them);
fields fewchips cannot honour get a 400 naming them; unknown fields are named in the log. Then the
operations side: generation_config.json defaults, /tokenize and /detokenize, chat_template_kwargs,
CORS, /health when the engine is down, and the deepseek_r1 reasoning split."""

import json
import logging
import os

import httpx
import pytest
import torch

from fewchips.inference.generation_config import generation_defaults
from fewchips.inference.reasoning import ReasoningSplit
from fewchips.inference.sampling import SamplingParams, adjust_logits, probabilities
from fewchips.inference.tokenizer import Tokenizer

from inference_utils import save_tiny_model_dir
from test_server import NAME, Served, serving

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("model") / "m")


@pytest.fixture(scope="module")
def served(model_dir):
    yield from serving(model_dir)


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0)


def complete(client, **kw):
    base = {"model": NAME, "prompt": "hello world", "max_tokens": 8, "temperature": 0}
    extra = {k: kw.pop(k) for k in list(kw) if k not in ("prompt", "max_tokens", "temperature", "seed", "stop",
                                                         "logit_bias", "n", "top_p")}
    return client.completions.create(**{**base, **kw}, extra_body=extra).choices[0]


# ---- refused by name ------------------------------------------------------------------------

CHAT = [{"role": "user", "content": "hi"}]
REFUSED = [
    ("/v1/completions", {"prompt": "hi", "best_of": 3}, "best_of"),
    ("/v1/completions", {"prompt": "hi", "suffix": "end"}, "suffix"),
    ("/v1/completions", {"prompt": "hi", "priority": 1}, "priority"),
    ("/v1/completions", {"prompt": "hi", "stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": CHAT, "tool_choice": "required"}, "tool_choice"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}, "messages"),
    ("/v1/completions", {"prompt": "hi", "stop_token_ids": [99999]}, "stop_token_ids"),
    ("/v1/completions", {"prompt": "hi", "min_p": 2}, "min_p"),
    ("/v1/completions", {"prompt": "hi", "repetition_penalty": 0}, "repetition_penalty"),
]


@pytest.mark.parametrize("path,body,param", REFUSED, ids=[p for _, _, p in REFUSED])
def test_fields_fewchips_cannot_honour_are_refused_by_name(served, path, body, param):
    r = httpx.post(served.url + path, json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and param.split("_")[0] in r.json()["error"]["message"] \
        or param == "messages"


def test_unknown_fields_are_named_in_the_log(served, caplog):
    with caplog.at_level(logging.WARNING, logger="fewchips.server"):
        r = httpx.post(served.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2, "guided_foo": 1,
                                                             "frobnicate": True})
    assert r.status_code == 200
    assert any("frobnicate, guided_foo" in m for m in caplog.messages), caplog.messages


# ---- honoured ---------------------------------------------------------------------------------

def test_stop_token_ids_min_tokens_and_ignore_eos(served, client):
    eos = served.tok.eos_token_id
    forced = {str(eos): 100}                       # eos is the greedy choice at every step
    assert complete(client, logit_bias=forced).finish_reason == "stop"
    r = client.completions.create(model=NAME, prompt="hello world", max_tokens=6, temperature=0, logit_bias=forced,
                                  extra_body={"min_tokens": 4})
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "stop"   # 4 forced others, then eos
    r = client.completions.create(model=NAME, prompt="hello world", max_tokens=6, temperature=0, logit_bias=forced,
                                  extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 6 and r.choices[0].finish_reason == "length"
    plain = client.completions.create(model=NAME, prompt="hello world", max_tokens=8, temperature=0)
    ids = served.tok.encode(plain.choices[0].text, add_special_tokens=False)
    r = client.completions.create(model=NAME, prompt="hello world", max_tokens=8, temperature=0,
                                  extra_body={"stop_token_ids": [ids[2]]})
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens <= 3


def test_include_stop_str_and_skip_special_tokens(served, client):
    text = complete(client, max_tokens=12).text
    stop = text[3:6]
    assert complete(client, max_tokens=12, stop=[stop]).text == text[:text.index(stop)]
    assert complete(client, max_tokens=12, stop=[stop], include_stop_str_in_output=True).text == \
        text[:text.index(stop) + len(stop)]
    eos = served.tok.eos_token_id
    shown = complete(client, max_tokens=3, logit_bias={str(eos): 100}, skip_special_tokens=False).text
    assert shown == "<eos>" and complete(client, max_tokens=3, logit_bias={str(eos): 100}).text == ""


def test_min_p_one_is_greedy_and_repetition_penalty_changes_the_output(served, client):
    greedy = complete(client, max_tokens=10).text
    for seed in range(3):
        assert complete(client, max_tokens=10, temperature=1.0, seed=seed, min_p=1.0).text == greedy
    assert complete(client, max_tokens=10, repetition_penalty=50.0).text != greedy


def test_repetition_penalty_and_min_p_match_transformers():
    """The same logits processors as transformers' (the numerical reference)."""
    tr = pytest.importorskip("transformers")
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 50, generator=g) * 3
    prompt, out = [[3, 4, 5], [7, 7]], [[5, 9], [1]]
    p = [SamplingParams(repetition_penalty=1.7), SamplingParams(repetition_penalty=0.6)]
    ours = adjust_logits(logits, p, out, prompt)
    for i, pen in enumerate((1.7, 0.6)):
        ref = tr.RepetitionPenaltyLogitsProcessor(pen)(torch.tensor([prompt[i] + out[i]]), logits[i:i + 1].clone())
        torch.testing.assert_close(ours[i], ref[0], rtol=0, atol=0)
    q = [SamplingParams(temperature=1.0, min_p=0.2)] * 2
    ref = tr.MinPLogitsWarper(0.2)(None, logits.clone()).softmax(-1)
    torch.testing.assert_close(probabilities(logits, q), ref, rtol=1e-6, atol=1e-7)


# ---- operations -------------------------------------------------------------------------------

def test_generation_config_defaults_and_request_values_win(tmp_path, model_dir):
    with open(os.path.join(model_dir, "generation_config.json"), "w") as f:
        json.dump({"temperature": 0.6, "top_p": 0.95, "do_sample": True, "max_new_tokens": 7, "eos_token_id": 2}, f)
    try:
        assert generation_defaults(model_dir) == {"temperature": 0.6, "top_p": 0.95, "max_tokens": 7}
        assert generation_defaults(model_dir, "vllm") == {}
        served = Served(model_dir, defaults={"temperature": 0.0, "max_tokens": 5})
    finally:
        os.remove(os.path.join(model_dir, "generation_config.json"))
    try:
        c = openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0)
        d = c.completions.create(model=NAME, prompt="hello world", extra_body={"seed": 0})
        assert d.usage.completion_tokens == 5                            # the model's max_new_tokens
        greedy = c.completions.create(model=NAME, prompt="hello world", max_tokens=5, temperature=0).choices[0].text
        assert d.choices[0].text == greedy                               # the model's temperature (0 here)
        assert c.completions.create(model=NAME, prompt="hello world", max_tokens=5, temperature=1.0,
                                    seed=1).choices[0].text != greedy    # the request's own wins
    finally:
        served.close()


def test_tokenize_detokenize_and_chat_template_kwargs(served):
    r = httpx.post(served.url + "/tokenize", json={"prompt": "hello world", "return_token_strs": True}).json()
    assert r["tokens"] == served.tok.encode("hello world") and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == 128 and "".join(r["token_strs"]).replace("Ġ", " ").endswith("hello world")
    chat = httpx.post(served.url + "/tokenize", json={"messages": CHAT}).json()
    assert chat["tokens"] == served.tok.apply_chat_template(CHAT)
    back = httpx.post(served.url + "/detokenize", json={"tokens": r["tokens"]}).json()
    assert back == {"prompt": served.tok.decode(r["tokens"], skip_special_tokens=False)}
    assert httpx.post(served.url + "/detokenize", json={"tokens": [10 ** 6]}).status_code == 400
    assert httpx.post(served.url + "/tokenize", json={}).status_code == 400

    original = served.tok.chat_template
    served.tok.set_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                                 "{% if thinking %} THINK{% endif %}")
    try:
        on = httpx.post(served.url + "/tokenize", json={"messages": CHAT, "chat_template_kwargs": {"thinking": True}})
        off = httpx.post(served.url + "/tokenize", json={"messages": CHAT})
        assert served.tok.decode(on.json()["tokens"]) == "hi THINK" and served.tok.decode(off.json()["tokens"]) == "hi"
        r = httpx.post(served.url + "/v1/chat/completions", json={"messages": CHAT, "max_tokens": 1,
                                                                   "chat_template_kwargs": {"thinking": True}})
        assert r.json()["usage"]["prompt_tokens"] == len(on.json()["tokens"])
    finally:
        served.tok.set_chat_template(original)


def test_cors_only_when_asked_and_health_503_when_the_engine_is_down(model_dir):
    s = Served(model_dir, allowed_origins=["http://localhost:3000"])
    try:
        pre = {"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST"}
        r = httpx.options(s.url + "/v1/completions", headers=pre)
        assert r.headers.get("access-control-allow-origin") == "http://localhost:3000"
        assert httpx.get(s.url + "/health").status_code == 200
        s.engine.stop()
        r = httpx.get(s.url + "/health")
        assert r.status_code == 503 and "not running" in r.json()["status"]
    finally:
        s.close()


def test_no_cors_headers_by_default(served):
    r = httpx.options(served.url + "/v1/completions",
                      headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in r.headers


# ---- reasoning --------------------------------------------------------------------------------

def think_tokenizer(tmp_path, with_tokens: bool) -> Tokenizer:
    """The tiny test tokenizer, with <think> and </think> as single (non-special) tokens or not."""
    from tokenizers import AddedToken

    from inference_utils import tiny_tokenizer
    t = tiny_tokenizer()
    if with_tokens:
        t.add_tokens([AddedToken("<think>", special=False), AddedToken("</think>", special=False)])
    return Tokenizer(t, {"eos_token": "<eos>"})


@pytest.mark.parametrize("with_tokens", [True, False], ids=["token ids", "text"])
def test_reasoning_split_streams_and_whole(tmp_path, with_tokens):
    tok = think_tokenizer(tmp_path, with_tokens)
    for output, reasoning, content in [("<think>\nlet me see, one two</think>\n\nhello world", "\nlet me see, one two",
                                        "\n\nhello world"),
                                       ("one two three", "one two three", None),
                                       ("a b</think>", "a b", ""),
                                       ("</think>hi", "", "hi")]:
        ids = tok.encode(output, add_special_tokens=False)
        whole = ReasoningSplit(tok, [])
        whole.push(ids)
        assert whole.text == (reasoning, content), (output, whole.text)
        split = ReasoningSplit(tok, [])
        parts = [split.push([t]) for t in ids] + [split.flush()]
        assert "".join(r for r, _ in parts) == reasoning and "".join(c for _, c in parts) == (content or "")


def test_a_prompt_that_closes_the_reasoning_gives_content_only(tmp_path):
    """A V3.1-style non-thinking prompt ends in </think>: the whole output is content."""
    tok = think_tokenizer(tmp_path, True)
    prompt = tok.encode("<think></think>", add_special_tokens=False)
    split = ReasoningSplit(tok, [], prompt=prompt)
    assert split.push(tok.encode("hello world", add_special_tokens=False)) == ("", "hello world")
    assert split.text == (None, "hello world")
    still_open = ReasoningSplit(tok, [], prompt=tok.encode("</think> x <think>", add_special_tokens=False))
    still_open.push(tok.encode("a b", add_special_tokens=False))
    assert still_open.text == ("a b", None)


def test_server_splits_reasoning_in_both_modes(model_dir):
    s = Served(model_dir, reasoning=True)
    try:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        r = c.chat.completions.create(model=NAME, messages=CHAT, max_tokens=8, temperature=0)
        m = r.choices[0].message
        assert m.content is None and m.reasoning_content and m.model_extra["reasoning"] == m.reasoning_content
        stream = list(c.chat.completions.create(model=NAME, messages=CHAT, max_tokens=8, temperature=0, stream=True))
        deltas = [ch.choices[0].delta for ch in stream if ch.choices]
        assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == m.reasoning_content
        assert not any(d.content for d in deltas)
    finally:
        s.close()
