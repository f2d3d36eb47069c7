"""`torchrun --nproc_per_node=N -m fewchips serve --ep N` on real gloo processes: rank 0 serves, every
rank runs each step with 1/N of the routed experts (each loads only its own). A batch of requests of
different lengths, sent together so the engine batches and chunks them, gets the greedy tokens of one
process and its logprobs within 1e-5 (fp32); the OpenAI client talks to it; SIGTERM ends every rank;
`generate --ep 2` prints one process's text."""

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
import torch

from inference_utils import save_tiny_model_dir
from workers import child_with_rank

pytestmark = [pytest.mark.multiprocess,
              pytest.mark.skipif(not os.path.exists("/proc/self/environ"),
                                 reason="finds torchrun's rank 0 through /proc")]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROMPTS = [list(range(5, 5 + n)) for n in (3, 17, 40, 9, 70, 1)]      # token ids; 70 > --max-prefill-tokens 32
MAX_TOKENS = 12


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("model"))


def engine_outputs(model, model_dir):
    """Tokens and logprobs of one process's engine on PROMPTS, with the server's settings."""
    from fewchips.inference.engine import Engine, Request
    from fewchips.inference.sampling import SamplingParams
    from fewchips.inference.tokenizer import Tokenizer
    tok = Tokenizer.from_dir(model_dir)
    engine = Engine(model, tok, max_batch=8, max_len=128, max_prefill_tokens=32)
    eos = tok.eos_token_id if tok.eos_token_id is not None else model.config.eos_token_id   # as the server stops
    reqs = engine.run([Request(p, SamplingParams(max_tokens=MAX_TOKENS, logprobs=0, stop_token_ids=[eos]))
                       for p in PROMPTS])
    return [([tok.token_text(t) for t in r.output_ids], [lp.logprob for lp in r.logprobs]) for r in reqs]


@pytest.fixture(scope="module")
def reference(model_dir):
    from fewchips import from_pretrained
    return engine_outputs(from_pretrained(model_dir, dtype=torch.float32, mtp=False), model_dir)


@pytest.fixture(scope="module")
def fp8_reference(model_dir):
    """One process with the recipe's weights block-quantised to E4M3 on load, as `--weights fp8` serves."""
    from fewchips.checkpoint.fp8 import load_fp8
    return engine_outputs(load_fp8(model_dir, dtype=torch.float32, mtp=False), model_dir)


def start(n, model_dir, port, extra=()):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                             "-m", "fewchips", "serve", "--model", model_dir, "--port", str(port), "--ep", str(n),
                             "--max-len", "128", "--max-batch", "8", "--max-prefill-tokens", "32", "--threads", "1",
                             "--device", "cpu", "--speculative", "none", "--shutdown-timeout", "5", "--model-name", "m",
                             *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(proc.stdout.read()[-4000:])
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise AssertionError("the ranked server did not come up: " + proc.stdout.read()[-4000:])


def complete(port, prompt):
    r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=120,
                   json={"model": "m", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "logprobs": 0})
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    return lp["tokens"], lp["token_logprobs"]


CASES = {   # name: (ranks, extra flags, reference)
    "ep2": (2, [], "reference"),
    "ep4": (4, [], "reference"),
    # replicas re-placed every 3 forward calls from the loads measured while serving
    "ep2-replicas": (2, ["--redundant-experts", "2", "--rebalance-every", "3"], "reference"),
    # E4M3 weights (block-quantised on load) and replicas placed from a loads file
    "ep4-fp8-replicas": (4, ["--weights", "fp8", "--redundant-experts", "4"], "fp8_reference"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_ep_server_gives_one_process_tokens_and_logprobs(model_dir, request, tmp_path, case):
    n, extra, ref = CASES[case]
    reference = request.getfixturevalue(ref)
    if case == "ep4-fp8-replicas":                    # expert 5 hot in every layer: its owner keeps it, 3 replicas
        loads = tmp_path / "loads.json"
        layers = ["model.layers.1.mlp.experts", "model.layers.2.mlp.experts", "model.layers.3.mlp.experts"]
        loads.write_text(json.dumps({"layers": {k: [1, 1, 1, 1, 1, 90, 1, 1] for k in layers}}))
        extra = [*extra, "--expert-loads", str(loads)]
    port = free_port()
    proc = start(n, model_dir, port, extra)
    try:
        with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:      # together: batched, chunked
            got = list(pool.map(lambda p: complete(port, p), PROMPTS))
        for (tokens, logprobs), (want_tokens, want_logprobs) in zip(got, reference):
            assert tokens == want_tokens
            assert logprobs == pytest.approx(want_logprobs, abs=1e-5)
        if "--redundant-experts" in extra:        # the imbalance with and without the replicas, live
            metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
            assert 'fewchips:expert_rank_load_imbalance{model_name="m",placement="served"}' in metrics
        if case == "ep2":
            openai = pytest.importorskip("openai")
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x")
            out = client.completions.create(model="m", prompt=PROMPTS[1], max_tokens=4, temperature=0)
            assert out.usage.completion_tokens == 4
        os.kill(child_with_rank(proc.pid, 0), signal.SIGTERM)         # what torchrun forwards, to the rank that serves
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out[-4000:]                # rank 0 drained, then every rank left cleanly
        assert "aborting" not in out and "Traceback" not in out, out[-4000:]
        held = [line for line in out.splitlines() if "MiB of weights (" in line]
        assert out.count("MiB of weights (") == n, out[-4000:]    # each rank says what it holds
        if "--redundant-experts" in extra:
            summary = [line for line in out.splitlines() if line.startswith("expert replicas")]
            assert len(summary) == 1, out[-4000:]
            if "--rebalance-every" in extra:
                assert "0 re-placements" not in summary[0]
            else:
                assert sum("replicas of 5" in line for line in held) == 3, held   # one copy on every rank
        if "--weights" in extra:
            assert all("FP8 E4M3" in line for line in held), held
    finally:
        if proc.poll() is None:
            proc.kill()


def test_generate_over_ranks_prints_one_process_text(model_dir):
    """`torchrun ... fewchips generate --ep 2`: rank 0 prints what one process prints (greedy)."""
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    flags = ["generate", "--model", model_dir, "--prompt", "the quick brown fox", "--max-new-tokens", "12",
             "--temperature", "0", "--threads", "1", "--device", "cpu"]
    one = subprocess.run([sys.executable, "-m", "fewchips", *flags], env=env, capture_output=True, text=True,
                         timeout=120)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "fewchips", *flags, "--ep", "2"], env=env, capture_output=True, text=True, timeout=180)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-4000:]
    assert two.stdout == one.stdout and one.stdout.startswith("the quick brown fox")
    assert two.stderr.count("MiB of weights (") == 2


def test_chat_over_ranks_says_what_one_process_says(model_dir):
    """`torchrun ... fewchips chat --ep 2`: rank 0 reads the terminal and answers as one process does."""
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    flags = ["chat", "--model", model_dir, "--max-new-tokens", "8", "--temperature", "0", "--threads", "1",
             "--device", "cpu", "--speculative", "none"]
    said = "the quick brown fox\n/reset\njumps over\n\n"
    one = subprocess.run([sys.executable, "-m", "fewchips", *flags], env=env, input=said, capture_output=True,
                         text=True, timeout=120)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "fewchips", *flags, "--ep", "2"], env=env, input=said, capture_output=True, text=True,
                         timeout=180)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-4000:]
    assert two.stdout == one.stdout and one.stdout.count("> ") == 5   # four lines read; the end of input quits
