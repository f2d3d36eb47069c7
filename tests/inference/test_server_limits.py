"""One client cannot take the server down, and the API has no silent gaps: oversized bodies get 413
before they are read, floods get 429 with Retry-After while ordinary requests are still served, a
hung-up non-streaming client frees its slot, parsing stays off the event loop, SIGTERM ends the
process within its timeout; penalties and logit_bias act as OpenAI defines them, unsupported fields
and out-of-range seeds are 400s naming the field, and echo returns the prompt as it was sent."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter

import httpx
import pytest
import torch

from fewchips.inference.server_limits import ServerLimits

from inference_utils import save_tiny_model_dir
from test_server import Served

LIMITS = ServerLimits(max_body_bytes=64 * 1024, max_prompts=8, max_n=4, max_waiting=4, shutdown_timeout=2.0)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    path = save_tiny_model_dir(tmp_path_factory.mktemp("model") / "m")
    with open(os.path.join(path, "tokenizer_config.json")) as f:
        cfg = json.load(f)
    cfg["add_bos_token"] = True                       # echo must not hand back a BOS the client never sent
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f)
    s = Served(path, limits=LIMITS, max_batch=1)
    yield s
    s.close()
    torch.set_num_threads(n)


def post(served, body, path="/v1/completions", **kw):
    return httpx.post(served.url + path, json=body, timeout=kw.pop("timeout", 60), **kw)


def raw_request(served, head: bytes, body_chunks=(), read=True) -> bytes:
    """An HTTP exchange on a plain socket (the client need not finish sending its body)."""
    with socket.create_connection(("127.0.0.1", served.port), timeout=10) as sock:
        sock.sendall(head)
        for c in body_chunks:
            try:
                sock.sendall(c)
            except OSError:            # the server answered and closed: it did not wait for the rest
                break
        reply = b""
        while read:                    # headers, then as many body bytes as content-length says
            part = sock.recv(65536)
            reply += part
            head_end = reply.find(b"\r\n\r\n")
            if not part or (head_end >= 0 and len(reply) - head_end - 4 >= _content_length(reply[:head_end])):
                break
        return reply


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


def slow_engine(served, monkeypatch, seconds):
    real = served.engine.runner.decode
    monkeypatch.setattr(served.engine.runner, "decode", lambda reqs: (time.sleep(seconds), real(reqs))[1])


def wait_idle(served, timeout=20):
    deadline = time.time() + timeout
    while served.engine.running or served.engine.waiting:
        assert time.time() < deadline, "the engine did not go idle"
        time.sleep(0.05)


# ---- limits ---------------------------------------------------------------------------------

def test_oversized_body_is_refused_before_it_is_read(served):
    t0 = time.time()
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 31457280\r\n\r\n")                          # 30 MB announced, none sent
    reply = raw_request(served, head)
    assert reply.startswith(b"HTTP/1.1 413") and b"at most 65,536" in reply and time.time() - t0 < 1.0
    # a chunked body (no length announced) is cut off once it passes the limit
    chunk = b"a" * 16384
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    reply = raw_request(served, head, [b"%x\r\n%s\r\n" % (len(chunk), chunk)] * 8)
    assert reply.startswith(b"HTTP/1.1 413")
    assert httpx.get(served.url + "/health").status_code == 200


def test_too_many_prompts_or_choices_are_400(served):
    r = post(served, {"prompt": ["hi"] * 9, "max_tokens": 1})
    assert (r.status_code == 400 and "at most 8" in r.json()["error"]["message"]
            and r.json()["error"]["param"] == "prompt")
    r = post(served, {"prompt": "hi", "max_tokens": 1, "n": 5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    r = post(served, {"prompt": ["a", "b", "c"], "max_tokens": 1, "n": 2})      # 6 generations > 4 queued
    assert r.status_code == 400 and "asks for 6 generations" in r.json()["error"]["message"]


@pytest.mark.slow
def test_flood_gets_429_and_ordinary_requests_are_still_served(served, monkeypatch):
    slow_engine(served, monkeypatch, 0.05)
    results = {}

    def send(i, max_tokens=8):
        results[i] = post(served, {"prompt": f"hello {i}", "max_tokens": max_tokens, "temperature": 0})

    threads = [threading.Thread(target=send, args=(0, 30))]             # request 0 holds the one slot
    threads[0].start()
    deadline = time.time() + 10
    while not served.engine.running:
        assert time.time() < deadline
        time.sleep(0.01)
    for i in range(1, 5):                                                # four more fill the queue (max_waiting 4)
        threads.append(threading.Thread(target=send, args=(i,)))
        threads[-1].start()
        while len(served.engine.waiting) < i:
            assert time.time() < deadline
            time.sleep(0.01)
    send(5)
    busy = results[5]
    assert busy.status_code == 429, busy.text
    assert busy.headers["retry-after"] == "1" and busy.json()["error"]["type"] == "rate_limit_error"
    assert httpx.get(served.url + "/health", timeout=2).json()["waiting"] == 4     # the event loop answers
    for t in threads:
        t.join()
    assert all(results[i].status_code == 200 for i in range(5))         # the queued ones were all served
    wait_idle(served)
    assert post(served, {"prompt": "ordinary", "max_tokens": 3}).status_code == 200


def test_hung_up_non_streaming_client_frees_its_slot(served, monkeypatch):
    aborted = []
    real_abort = served.engine.abort
    monkeypatch.setattr(served.engine, "abort", lambda r: (aborted.append(r), real_abort(r)))
    slow_engine(served, monkeypatch, 0.02)                              # 120 tokens take >= 2.4 s
    with pytest.raises(httpx.ReadTimeout):
        post(served, {"prompt": "hello", "max_tokens": 120, "temperature": 0}, timeout=0.5)
    wait_idle(served, timeout=5)
    assert served.engine.pool.n_used == 0                               # its blocks are back
    assert [r.finish_reason for r in aborted] == ["abort"] and len(aborted[0].output_ids) < 100


@pytest.mark.slow
def test_parsing_and_tokenising_stay_off_the_event_loop(tmp_path):
    """A body that takes a while to tokenise (2 MB of text) does not stall /health."""
    s = Served(save_tiny_model_dir(tmp_path / "m"), limits=ServerLimits(max_body_bytes=8 * 2**20))
    try:
        slow = threading.Thread(target=post, args=(s, {"prompt": "the quick brown fox " * 100_000, "max_tokens": 1}))
        t0 = time.time()
        slow.start()
        time.sleep(0.05)
        worst = 0.0
        while slow.is_alive() and time.time() - t0 < 30:
            t = time.time()
            assert httpx.get(s.url + "/health", timeout=5).status_code == 200
            worst = max(worst, time.time() - t)
        slow.join()
        assert worst < 0.5, worst
    finally:
        s.close()


@pytest.mark.multiprocess
def test_sigterm_ends_the_server_within_its_timeout(tmp_path):
    model_dir = save_tiny_model_dir(tmp_path / "m")
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "fewchips", "serve", "--model", model_dir, "--port", str(port),
                             "--max-len", "128", "--shutdown-timeout", "2"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.3)
        # keep the server busy: streams that would run far past the timeout
        streams = [threading.Thread(target=lambda: httpx.post(url + "/v1/completions", timeout=60, json={
            "prompt": "hello", "max_tokens": 100, "stream": True, "temperature": 0, "n": 4})) for _ in range(2)]
        for t in streams:
            t.start()
        time.sleep(0.5)
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=2 + 8)
        assert time.time() - t0 < 2 + 8
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---- no silent API gaps ---------------------------------------------------------------------

def greedy_by_hand(model, ids, n, stop, frequency=0.0, presence=0.0, bias=None):
    """OpenAI's definition, on full forwards: logit_j -= c_j * frequency + [c_j > 0] * presence, + bias."""
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids + out]))[0, -1].double()
            for j, c in Counter(out).items():
                logits[j] -= c * frequency + presence
            for j, b in (bias or {}).items():
                logits[j] += b
            out.append(int(logits.argmax()))
            if out[-1] in stop:
                break
    return out


@pytest.mark.parametrize("frequency,presence", [(1.5, 0.0), (0.0, 2.0), (0.7, -0.5)])
def test_penalties_follow_openai(served, frequency, presence):
    ids = [5, 40, 77, 120, 9]
    body = {"prompt": [ids], "max_tokens": 20, "temperature": 0, "frequency_penalty": frequency,
            "presence_penalty": presence}
    got = post(served, body).json()["choices"][0]["text"]
    stop = [served.tok.eos_token_id]
    want = greedy_by_hand(served.model, ids, 20, stop, frequency, presence)
    assert got == served.tok.decode(want)
    assert want != greedy_by_hand(served.model, ids, 20, stop)              # the penalty changed something


def test_logit_bias_forces_and_bans(served):
    ids = [5, 40, 77]
    forced = post(served, {"prompt": [ids], "max_tokens": 4, "temperature": 0, "logit_bias": {"100": 100}}).json()
    assert forced["choices"][0]["text"] == served.tok.decode([100] * 4)
    plain = greedy_by_hand(served.model, ids, 6, [served.tok.eos_token_id])
    banned = {str(plain[0]): -100}
    got = post(served, {"prompt": [ids], "max_tokens": 6, "temperature": 0, "logit_bias": banned}).json()
    want = greedy_by_hand(served.model, ids, 6, [served.tok.eos_token_id], bias={plain[0]: -100})
    assert got["choices"][0]["text"] == served.tok.decode(want) and want[0] != plain[0]


BAD = [
    ({"prompt": "hi", "seed": 99999999999999999999999}, "seed"),
    ({"prompt": "hi", "seed": -(2**63) - 1}, "seed"),
    ({"prompt": "hi", "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"prompt": "hi", "response_format": {"type": "xml"}}, "response_format"),
    ({"prompt": "hi", "logit_bias": {"99999": 1}}, "logit_bias"),
    ({"prompt": "hi", "logit_bias": {"5": 101}}, "logit_bias"),
    ({"prompt": "hi", "frequency_penalty": 3}, "frequency_penalty"),
]


@pytest.mark.parametrize("body,field", BAD, ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD)])
@pytest.mark.parametrize("path,stream", [("/v1/completions", False), ("/v1/completions", True),
                                         ("/v1/chat/completions", False)])
def test_unsupported_or_out_of_range_fields_are_400(served, body, field, path, stream):
    if path.endswith("chat/completions"):
        body = {k: v for k, v in body.items() if k != "prompt"} | {"messages": [{"role": "user", "content": "hi"}]}
    r = post(served, {**body, "max_tokens": 2, "stream": stream}, path=path)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field and field in r.json()["error"]["message"]


def test_supported_forms_of_those_fields_are_accepted(served):
    ok = {"prompt": "hi", "max_tokens": 2, "tools": [], "response_format": {"type": "text"}, "seed": 2**63 - 1,
          "logit_bias": {}}
    assert post(served, ok).status_code == 200
    assert post(served, {**ok, "seed": -(2**63), "n": 2, "temperature": 1.0}).status_code == 200


def test_echo_returns_the_prompt_as_sent(served):
    prompt = "  hello   world "
    ids = served.tok.encode(prompt)
    assert ids[0] == served.tok.bos_token_id                            # the server adds a BOS ...
    r = post(served, {"prompt": prompt, "max_tokens": 3, "temperature": 0, "echo": True}).json()
    gen = r["choices"][0]["text"]
    assert gen.startswith(prompt) and "<bos>" not in gen               # ... but echoes only what was sent
    r = post(served, {"prompt": prompt, "max_tokens": 3, "temperature": 0, "echo": True, "stream": True})
    chunks = [json.loads(ln[6:]) for ln in r.text.splitlines() if ln.startswith("data: {")]
    assert chunks[0]["choices"][0]["text"] == prompt
