"""benchmarks/device_all.py --smoke runs every section's code on CPU and records each in $OUT; a section
that raises, exits or hangs past its budget is recorded and the sections after it still run."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "benchmarks", "device_all.py")


def sections() -> list[str]:
    path = list(sys.path)
    spec = importlib.util.spec_from_file_location("device_all", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)               # standard library only at import
    sys.path[:] = path                            # it puts benchmarks/ first for its own imports
    return list(module.SECTIONS)


def run(out, *flags, timeout):
    env = {**os.environ, "OUT": str(out)}
    return subprocess.run([sys.executable, SCRIPT, "--smoke", *flags], env=env, capture_output=True, text=True,
                          timeout=timeout)


def record(out, name) -> dict:
    with open(os.path.join(out, f"{name}.json")) as f:
        return json.load(f)


@pytest.mark.multiprocess
def test_smoke_runs_every_section(tmp_path):
    p = run(tmp_path, timeout=600)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    names = sections()
    for name in names:
        rec = record(tmp_path, name)
        assert "error" not in rec, (name, rec.get("error"), rec.get("traceback"))
        assert rec["finished"] and rec["smoke"], name
    summary = record(tmp_path, "summary")
    assert list(summary["sections"]) == names and summary["failed"] == []
    train = record(tmp_path, "train")                     # both losses over the same steps, an MFU each
    assert len(train["bf16"]["losses"]) == len(train["fp8"]["losses"]) >= 2
    assert train["bf16"]["mfu"] > 0 and train["fp8"]["mfu"] > 0
    parallel = record(tmp_path, "parallel")
    # the CUDA-only pieces are named with what replaced them
    assert all("FP8 scaled_mm" in record(tmp_path, n)["substituted"] for n in ("train", "fp8_gemm"))
    assert all("NCCL" in record(tmp_path, n)["substituted"] for n in ("parallel", "serve_ranks"))
    assert parallel["one_rank_checks_passed"] and set(parallel["layouts"]) == {"ep2", "pp2-dualpipev"}
    assert record(tmp_path, "serve_ranks")["tokens_equal"]


@pytest.mark.multiprocess
def test_failing_sections_are_recorded_and_the_rest_run(tmp_path):
    p = run(tmp_path, "--sections", "env,train,decode,fp8_gemm", "--fail-section", "env",
            "--fail-section", "train:exit", "--fail-section", "decode:hang", "--budget", "decode=3", timeout=300)
    assert p.returncode == 1, p.stdout[-4000:] + p.stderr[-4000:]
    env = record(tmp_path, "env")                          # raised: its error and traceback
    assert "deliberate failure" in env["error"] and "RuntimeError" in env["traceback"] and env["reached"]
    train = record(tmp_path, "train")                      # exited without a word: the parent records it
    assert train["status"] == "crashed" and "code 3" in train["error"] and train["reached"]
    decode = record(tmp_path, "decode")                    # killed past its budget, what it wrote is kept
    assert decode["status"] == "timeout" and "budget of 3 s" in decode["error"] and decode["reached"]
    fp8 = record(tmp_path, "fp8_gemm")                     # and the section after them all ran
    assert "error" not in fp8 and fp8["finished"] and fp8["gemm"]
    summary = record(tmp_path, "summary")
    assert summary["failed"] == ["env", "train", "decode"]
    assert [v["status"] for v in summary["sections"].values()] == ["error", "crashed", "timeout", "ok"]
