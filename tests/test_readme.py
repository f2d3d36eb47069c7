"""The README's commands, run as written, one after another, from a copy of this checkout: `make demo`
(shortened with DEMO_FLAGS, the one change), then the "Using it" shell blocks in one shell, venv
activation first. What broke once: the block's second line failed with "command not found"."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bash_blocks(text: str) -> list[list[str]]:
    """Each ```bash block's commands, comments and optional [--flags] taken out."""
    blocks = []
    for body in re.findall(r"```bash\n(.*?)```", text, re.S):
        lines = [re.sub(r"\s+#.*$|\s*\[[^\]]*\]", "", line).strip() for line in body.splitlines()]
        blocks.append([line for line in lines if line])
    return blocks


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_the_readme_commands_run_as_written(tmp_path):
    if not os.path.exists(os.path.join(ROOT, ".venv", "bin", "fewchips")):
        pytest.skip("needs the .venv that `make` makes")
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        first, info, using = bash_blocks(f.read())[:3]
    assert first == ["make demo", "make test"] and info[0].startswith("source .venv/bin/activate"), (first, info)
    using = info + using
    copy = tmp_path / "clone"
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in files:                             # mtimes kept: make sees the venv as up to date
        if os.path.isfile(os.path.join(ROOT, name)):
            os.makedirs(copy / os.path.dirname(name), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, name), copy / name)
    os.symlink(os.path.join(ROOT, ".venv"), copy / ".venv")
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep)
                                  if not p.startswith(os.path.dirname(sys.executable)))

    # `make test` is what runs this test; -o: never reinstall into the shared venv from the copy
    demo = subprocess.run(["make", "demo", "-o", ".venv/.installed", "DEMO_FLAGS=--steps 20 --no-progress"],
                          cwd=copy, env=env, capture_output=True, text=True, timeout=900)
    assert demo.returncode == 0 and "sample 1" in demo.stdout, demo.stdout[-2000:] + demo.stderr[-3000:]

    port = free_port()
    script = ["set -euo pipefail"]
    for line in using:
        if line.startswith("fewchips serve"):      # serves until stopped: asked once, then stopped below
            script.append(line.replace("--port 8000", f"--port {port}") + " & echo $! > serve.pid")
        elif line.startswith("fewchips chat"):
            script.append(line + " < /dev/null")   # the end of input ends the session
        else:
            script.append(line)
    shell = subprocess.Popen(["bash", "-c", "\n".join(script)], cwd=copy, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        deadline, answer = time.time() + 600, None
        while answer is None and time.time() < deadline and shell.poll() in (None, 0):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as r:
                    answer = r.read().decode()
            except OSError:
                time.sleep(1)
        assert answer and '"demo"' in answer, (answer, shell.poll())
    finally:
        pid = copy / "serve.pid"
        if pid.exists():
            os.kill(int(pid.read_text()), 2)
        out = shell.communicate(timeout=120)[0]
    assert shell.returncode == 0, out[-4000:]
    assert out.count(" tok/s") >= 3 and "command not found" not in out, out[-4000:]
