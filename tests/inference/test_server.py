"""The OpenAI-compatible server answers the official `openai` client (completions, chat, streaming,
scoring with logprobs+echo), turns bad requests into 4xx OpenAI-style errors without dying, enforces
the API key, and serves 16 concurrent streaming clients complete, correct answers."""

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

import fewchips
from fewchips.checkpoint import from_pretrained
from fewchips.inference.engine import Engine
from fewchips.inference.server import create_app
from fewchips.inference.tokenizer import Tokenizer

from inference_utils import save_tiny_model_dir

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

NAME = "tiny-test"


class Served:
    def __init__(self, path, api_key=None, limits=None, max_batch=16, speculative=None, max_len=128, **app):
        self.model = from_pretrained(path, dtype=torch.float32)
        self.tok = Tokenizer.from_dir(path)
        self.engine = Engine(self.model, self.tok, max_batch=max_batch, max_len=max_len,
                             speculative=speculative).start()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        config = uvicorn.Config(create_app(self.engine, self.tok, NAME, api_key=api_key, limits=limits, **app),
                                host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.engine.stop()

    def greedy_text(self, prompt_ids, n):
        """What plain greedy `generate` produces for these ids, as text (stopping at eos like the server)."""
        out = fewchips.generate(self.model, [prompt_ids], max_new_tokens=n, stop_token_ids=[self.tok.eos_token_id])[0]
        return self.tok.decode(out[len(prompt_ids):])


def serving(path, **kw):
    """A module's server fixture body: `Served(path, **kw)` on one torch thread (tiny models decode fastest
    so), closed and the thread count restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    s = Served(path, **kw)
    yield s
    s.close()
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    yield from serving(save_tiny_model_dir(tmp_path_factory.mktemp("model") / "m"))


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0)


def test_models_and_health(served, client):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert httpx.get(served.url + "/health").json()["status"] == "ok"


def test_completion_matches_generate(served, client):
    r = client.completions.create(model=NAME, prompt="hello world", max_tokens=12, temperature=0)
    ids = served.tok.encode("hello world")
    assert r.choices[0].text == served.greedy_text(ids, 12)
    assert r.usage.prompt_tokens == len(ids) and r.usage.total_tokens == len(ids) + r.usage.completion_tokens
    assert r.choices[0].finish_reason in ("stop", "length")


def test_completion_stream_equals_non_stream(served, client):
    full = client.completions.create(model=NAME, prompt="the quick brown", max_tokens=20, temperature=0)
    chunks = list(client.completions.create(model=NAME, prompt="the quick brown", max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_chat_and_chat_stream(served, client):
    msgs = [{"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "how are you today?"}]}]
    r = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=10, temperature=0)
    plain = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "how are you today?"}]
    ids = served.tok.apply_chat_template(plain)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == served.greedy_text(ids, 10)
    assert r.usage.prompt_tokens == len(ids)
    stream = list(client.chat.completions.create(model=NAME, messages=msgs, max_completion_tokens=10, temperature=0,
                                                 stream=True))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream) == r.choices[0].message.content
    assert stream[-1].choices[0].finish_reason == r.choices[0].finish_reason


def test_stop_n_seed(served, client):
    base = client.completions.create(model=NAME, prompt="one two", max_tokens=16, temperature=0).choices[0].text
    stop = base[4:6]
    r = client.completions.create(model=NAME, prompt="one two", max_tokens=16, temperature=0, stop=[stop])
    assert r.choices[0].text == base[: base.index(stop)] and r.choices[0].finish_reason == "stop"
    kw = dict(model=NAME, prompt="one two", max_tokens=12, temperature=1.0, top_p=0.9, n=3, seed=11)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices] and len(a.choices) == 3
    assert len({c.text for c in a.choices}) > 1                  # choice j draws with seed + j


def test_scoring_with_token_id_prompts(served):
    """What evaluation harnesses send: a list of token-id lists, echo, logprobs, max_tokens 1 and 0."""
    ctx = [5, 40, 77, 120, 9, 33]
    body = {"model": NAME, "prompt": [ctx], "max_tokens": 1, "temperature": 0, "logprobs": 1, "echo": True,
            "seed": 1234, "logit_bias": {}, "user": "x"}
    r = httpx.post(served.url + "/v1/completions", json=body, headers={"Authorization": "Bearer"}).json()
    lp = r["choices"][0]["logprobs"]
    assert len(lp["token_logprobs"]) == len(ctx) + 1 and lp["token_logprobs"][0] is None
    with torch.no_grad():
        want = torch.log_softmax(served.model(torch.tensor([ctx]))[0].float(), -1)
    for i in range(1, len(ctx)):
        assert lp["token_logprobs"][i] == pytest.approx(want[i - 1, ctx[i]].item(), abs=1e-4)
    gen = lp["token_logprobs"][-1]
    assert gen == max(lp["top_logprobs"][-1].values())          # greedy: exactly the top entry
    assert lp["text_offset"][0] == 0 and r["usage"]["prompt_tokens"] == len(ctx)
    body.update(max_tokens=0)
    r = httpx.post(served.url + "/v1/completions", json=body).json()
    assert len(r["choices"][0]["logprobs"]["token_logprobs"]) == len(ctx) and r["usage"]["completion_tokens"] == 0


BAD = [
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": ', "not valid JSON"),
    ("/v1/completions", b'[1, 2, 3]', "JSON object"),
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": "lots"}', "max_tokens"),
    ("/v1/completions", b'{"prompt": "hi", "temperature": "hot"}', "temperature"),
    ("/v1/completions", b'{"prompt": {"a": 1}}', "prompt"),
    ("/v1/completions", b'{"prompt": "hi", "stop": 5}', "stop"),
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": -1}', "max_tokens"),
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": 1000000000}', "context length"),
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": 1e300}', "max_tokens"),
    ("/v1/completions", json.dumps({"prompt": list(range(3, 200)), "max_tokens": 1}).encode(), "context length"),
    ("/v1/completions", b'{"prompt": ""}', "empty"),
    ("/v1/completions", b'{"prompt": []}', "prompt"),
    ("/v1/completions", b'{"prompt": [5, 99999]}', "token ids"),
    ("/v1/completions", b'{"prompt": "hi", "n": 0}', "n"),
    ("/v1/completions", b'{}', "prompt"),
    ("/v1/chat/completions", b'{"messages": []}', "messages"),
    ("/v1/chat/completions", b'{"messages": [{"role": "wizard", "content": "hi"}]}', "role"),
    ("/v1/chat/completions", b'{"messages": "hello"}', "messages"),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "a " * 300}]}).encode(), "context"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}', "max_tokens"),
]


@pytest.mark.parametrize("path,body,needle", BAD, ids=[f"{i}" for i in range(len(BAD))])
def test_bad_requests_get_openai_style_4xx(served, path, body, needle):
    r = httpx.post(served.url + path, content=body, headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"} and needle.lower() in err["message"].lower()
    assert httpx.get(served.url + "/health").status_code == 200  # still alive


def test_client_sees_typed_errors(served, client):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=NAME, messages=[], max_tokens=5)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-nope", prompt="hi", max_tokens=5)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=NAME, prompt="hi", max_tokens=100000)


@pytest.mark.slow
def test_sixteen_concurrent_streaming_clients(served):
    prompts = [f"{w} " * (1 + i % 4) + str(i) for i, w in enumerate(["hello", "one", "the", "a"] * 4)]
    n_tokens = [10 + (i * 3) % 11 for i in range(16)]
    want = [served.greedy_text(served.tok.encode(p), n) for p, n in zip(prompts, n_tokens)]
    served.engine.peak_batch = 0

    def one(i):
        c = openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0)
        if i % 2:
            chunks = list(c.completions.create(model=NAME, prompt=prompts[i], max_tokens=n_tokens[i], temperature=0,
                                               stream=True))
            return "".join(ch.choices[0].text for ch in chunks if ch.choices), chunks[-1].choices[0].finish_reason
        with httpx.stream("POST", served.url + "/v1/completions", json={
                "model": NAME, "prompt": prompts[i], "max_tokens": n_tokens[i], "temperature": 0, "stream": True},
                timeout=60) as r:
            lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        parsed = [json.loads(ln[6:]) for ln in lines[:-1]]
        return "".join(p["choices"][0]["text"] for p in parsed), parsed[-1]["choices"][0]["finish_reason"]

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(one, range(16)))
    for (text, finish), w in zip(got, want):
        assert text == w and finish in ("stop", "length")
    assert served.engine.peak_batch > 1                        # they were decoded together


def test_disconnected_stream_frees_its_slot(served, monkeypatch):
    aborted = []
    real_abort = served.engine.abort
    monkeypatch.setattr(served.engine, "abort", lambda r: (aborted.append(r), real_abort(r)))
    # 120 tokens take >= 1.2 s: the hang-up lands first even on an idle machine
    real_decode = served.engine.runner.decode
    monkeypatch.setattr(served.engine.runner, "decode", lambda reqs: (time.sleep(0.01), real_decode(reqs))[1])
    with httpx.stream("POST", served.url + "/v1/completions", json={
            "model": NAME, "prompt": "hello", "max_tokens": 120, "stream": True, "temperature": 0}, timeout=30) as r:
        next(r.iter_lines())                                       # first chunk, then hang up
    deadline = time.time() + 20
    while served.engine.running or served.engine.waiting:
        assert time.time() < deadline, "the abandoned request kept decoding"
        time.sleep(0.05)
    assert served.engine.pool.n_used == 0
    assert [r.finish_reason for r in aborted] == ["abort"] and len(aborted[0].output_ids) < 100


def test_api_key(tmp_path):
    path = save_tiny_model_dir(tmp_path / "m", seed=1)
    s = Served(path, api_key="sekrit")
    try:
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        bad = openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        good = openai.OpenAI(base_url=s.url + "/v1", api_key="sekrit", max_retries=0)
        assert good.completions.create(model=NAME, prompt="hi", max_tokens=2).usage.completion_tokens >= 1
        assert httpx.get(s.url + "/health").status_code == 200
    finally:
        s.close()


def test_prefix_cache_in_usage_and_metrics(served, client):
    """Two chats sharing a long system prompt: the second reports the cached prompt tokens in OpenAI's
    `usage.prompt_tokens_details.cached_tokens`, and /metrics (Prometheus text, vLLM's names under the
    fewchips: prefix) counts the hits, the tokens and the time to first token."""
    from prometheus_client.parser import text_string_to_metric_families

    system = {"role": "system", "content": "one two three four five six seven eight nine ten. " * 2}
    first = client.chat.completions.create(model=NAME, messages=[system, {"role": "user", "content": "hello"}],
                                           max_tokens=3, temperature=0)
    second = client.chat.completions.create(model=NAME, messages=[system, {"role": "user", "content": "how are you"}],
                                            max_tokens=3, temperature=0)
    assert first.usage.prompt_tokens > 48
    assert second.usage.prompt_tokens_details.cached_tokens >= 32
    text = httpx.get(served.url + "/metrics").text
    samples = {(s.name, s.labels.get("finished_reason")): s.value for f in text_string_to_metric_families(text)
               for s in f.samples if s.labels.get("model_name") == served.engine.metrics.model_name}
    assert samples[("fewchips:prefix_cache_hits_total", None)] >= 32
    assert samples[("fewchips:prompt_tokens_total", None)] >= first.usage.prompt_tokens
    assert samples[("fewchips:generation_tokens_total", None)] >= 6
    assert samples[("fewchips:time_to_first_token_seconds_count", None)] >= 2
    assert samples[("fewchips:request_success_total", "length")] >= 2
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "num_preemptions_total",
                 "inter_token_latency_seconds_count"):
        assert ("fewchips:" + name, None) in samples


def test_speculative_server_answers_as_plain_and_reports_drafts(tmp_path, served):
    """An engine with MTP speculation behind the openai client: the same greedy text, streamed or not, for
    concurrent requests; usage counts the verified drafts (completion_tokens_details)."""
    s = Served(save_tiny_model_dir(tmp_path / "m"), speculative="mtp")
    try:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        prompts = ["hello world", "one two three", "the quick brown fox"]
        with ThreadPoolExecutor(3) as pool:
            got = list(pool.map(lambda p: c.completions.create(model=NAME, prompt=p, max_tokens=10, temperature=0),
                                prompts))
        for p, r in zip(prompts, got):
            assert r.choices[0].text == served.greedy_text(served.tok.encode(p), 10)
            d = r.usage.completion_tokens_details
            assert d.accepted_prediction_tokens + d.rejected_prediction_tokens >= 1
    finally:
        s.close()
