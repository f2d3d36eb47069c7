"""Rewards: math reads only the designated final answer and stops on a gold answer it cannot parse; code
is the tests' own count on a channel the completion cannot write (early exits, hooks, monkeypatches and
forged output score 0), in a sandbox that lets no process, byte or file out and refuses where it cannot be made."""

import glob
import json
import os
import random
import socket
import tempfile
import time
import uuid

import pytest

import fewchips.train.rewards as R
from fewchips.train.config import TrainError
from fewchips.train.grpo import load_task, read_prompts
from fewchips.train.rewards import code_sandbox, code_tests, math_answer

TESTS = "assert add(2, 3) == 5\nassert add(1, 1) == 2"
ADD = "\ndef add(a, b):\n    return a + b\n"


# ---- math -------------------------------------------------------------------------------------

@pytest.mark.parametrize("answer, completion, want", [
    ("1/2", "\\boxed{0.5}", 1.0), ("\\frac{1}{2}", "The answer is $\\boxed{\\frac{2}{4}}$.", 1.0),
    ("7", "so it is \\boxed{7}", 1.0), ("2", "$\\boxed{\\sqrt{4}}$", 1.0), ("x^2+1", "\\boxed{1 + x^{2}}", 1.0),
    ("7", "\\boxed{3}, no: \\boxed{7}", 1.0), ("7", "\\boxed{7}, no: \\boxed{3}", 0.0),     # the last box counts
    ("7", "\\boxed{-7}", 0.0), ("7", "\\boxed{seven}", 0.0), ("0.25", "\\boxed{1/3}", 0.0), ("3", "", 0.0),
    ("7", "so it is 7", 0.0), ("7", "7", 0.0), ("1/2", "0.5", 0.0), ("7", "\\boxed{7", 0.0),    # no box: 0
])
def test_math_reward_reads_the_boxed_answer_only(answer, completion, want):
    pytest.importorskip("math_verify")
    assert math_answer(completion, answer) == want


def test_math_reward_reads_a_final_answer_line_when_asked():
    pytest.importorskip("math_verify")
    assert math_answer("2 + 5\nFinal answer: 7.", "7", answer_format="final_line") == 1.0
    assert math_answer("FINAL ANSWER: $\\frac{1}{2}$", "0.5", answer_format="final_line") == 1.0
    assert math_answer("it is 7", "7", answer_format="final_line") == 0.0
    assert math_answer("\\boxed{7}", "7", answer_format="final_line") == 0.0
    with pytest.raises(ValueError, match="answer_format must be one of boxed, final_line"):
        math_answer("\\boxed{7}", "7", answer_format="box")


def test_an_unparsable_gold_answer_stops_the_run_naming_the_row(tmp_path):
    pytest.importorskip("math_verify")
    with pytest.raises(TrainError, match=r"p\.jsonl:3: math-verify cannot parse its answer '\?\?\?'"):
        math_answer("\\boxed{7}", "???", where="p.jsonl:3")
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps(row) + "\n" for row in ({"prompt": "2+5?", "answer": "7"},
                                                            {"prompt": "?", "answer": "{{"})))
    task, (good, bad) = load_task("math", str(f)), read_prompts(str(f))
    assert task.reward(good.messages, "\\boxed{7}", good) == 1.0
    with pytest.raises(TrainError, match=r"p\.jsonl:2: math-verify cannot parse its answer '\{\{'"):
        task.reward(bad.messages, "\\boxed{7}", bad)


# ---- code: the tests' own result --------------------------------------------------------------

@pytest.fixture(params=["sandboxed", "unsafe"])
def mode(request, monkeypatch):
    """The code reward's keywords for each way it runs: in the sandbox, and opted in without one (the
    harness is the same, so every exploit of it must fail both ways)."""
    if request.param == "sandboxed":
        if not R._sandbox().pids:
            pytest.skip(f"no sandbox with a PID namespace here: {R._sandbox().why}")
        return {}
    monkeypatch.setattr(R, "_sandbox", lambda: R.Sandbox((), (), "turned off by the test"))
    return {"unsafe": True}


@pytest.fixture
def sandboxed():
    if not R._sandbox().pids:
        pytest.skip(f"no sandbox with a PID namespace here: {R._sandbox().why}")


@pytest.mark.multiprocess
def test_right_scores_1_and_half_right_half_with_the_fractional_reward(mode):
    assert code_tests("```python" + ADD + "```", TESTS, **mode) == 1.0
    assert code_tests("```python" + ADD + "```", TESTS, fraction=True, **mode) == 1.0
    half = "def add(a, b):\n    return 2"                              # add(1, 1) == 2 holds, add(2, 3) == 5 not
    assert code_tests(half, TESTS, **mode) == 0.0
    assert code_tests(half, TESTS, fraction=True, **mode) == 0.5
    assert code_tests("def add(a, b):\n    return a - b", TESTS, fraction=True, **mode) == 0.0


@pytest.mark.multiprocess
def test_what_counts_as_a_test(mode):
    """Top-level asserts are the tests; another statement that fails makes it 0; tests without a
    top-level assert are one test; a completion that raises or does not compile scores 0."""
    assert R.count_tests(TESTS) == 2 and R.count_tests("def check(f):\n    assert f(1, 1) == 2\ncheck(add)") == 1
    setup_fails = "x = undefined_name\nassert add(1, 1) == 2\nassert add(2, 3) == 5"
    assert code_tests(ADD, setup_fails, fraction=True, **mode) == 0.0
    check = "def check(f):\n    assert f(2, 3) == 5\n    assert f(1, 1) == 2\ncheck(add)"
    assert code_tests(ADD, check, **mode) == 1.0
    assert code_tests("def add(a, b):\n    return 2", check, fraction=True, **mode) == 0.0
    assert code_tests(ADD + "raise ValueError('after the definitions')", TESTS, **mode) == 0.0
    assert code_tests("def add(a, b) return a + b", TESTS, **mode) == 0.0
    with pytest.raises(ValueError, match="the row's tests are not Python"):
        code_tests(ADD, "assert add(1, 1) ==", **mode)


FORGED = b"R\\n2 2 0123456789abcdef0123456789abcdef\\n"
EXPLOITS = {   # each defines a wrong add (or none), then tries to score anyway
    "os._exit(0)": "import os\nos._exit(0)",
    "sys.exit(0)": "import sys\nsys.exit(0)",
    "raise SystemExit": "raise SystemExit(0)",
    "atexit hook": "import atexit, os\natexit.register(os._exit, 0)\ndef add(a, b):\n    return 0",
    "exit inside a test": "import os\ndef add(a, b):\n    os._exit(0)",
    "sys.exit inside a test": "import sys\ndef add(a, b):\n    sys.exit(0)",
    "kills itself": "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)",
    "monkeypatched": ("import builtins, os, sys\nsys.exit = os._exit = builtins.exec = builtins.compile = "
                      "lambda *a, **k: None\nbuiltins.AssertionError = builtins.BaseException = KeyError\n"
                      "def add(a, b):\n    return 0"),
    "forged result lines": (f"import os, sys\nfor fd in (1, 2):\n    os.write(fd, b'{FORGED.decode()}')\n"
                            "print('R'); print('2 2 ok'); sys.stdout.flush()\ndef add(a, b):\n    return 0"),
}


@pytest.mark.multiprocess
@pytest.mark.parametrize("exploit", list(EXPLOITS))
def test_early_exits_hooks_monkeypatches_and_forged_output_score_0(exploit, mode):
    assert code_tests(EXPLOITS[exploit], TESTS, **mode) == 0.0
    assert code_tests(EXPLOITS[exploit], TESTS, fraction=True, **mode) == 0.0


# ---- code: containment ------------------------------------------------------------------------

def _running(marker: str, settle: float = 0.0) -> list[int]:
    """The processes of this machine with `marker` in their command line, looked for again for up to
    `settle` s while there are some (a killed process that is not the call's child dies on its own time)."""
    deadline = time.monotonic() + settle
    while True:
        out = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        out.append(int(pid))
            except OSError:
                pass
        if not out or time.monotonic() > deadline:
            return out
        time.sleep(0.02)


def _sleeper(marker: str) -> str:
    """Code that starts `spawn` (which must run `[sys.executable, '-c', SLEEP, marker]`), waits until it
    runs (else raises: no score), then defines a right add."""
    return (f"import os, sys, time\nMARKER = {marker!r}\nSLEEP = 'import time; time.sleep(30)'\n"
            "def running():\n"
            "    for p in filter(str.isdigit, os.listdir('/proc')):\n"
            "        try:\n"
            "            if MARKER.encode() in open(f'/proc/{p}/cmdline', 'rb').read():\n"
            "                return True\n"
            "        except OSError:\n"
            "            pass\n"
            "spawn()\n"
            "for _ in range(250):\n"
            "    if running():\n"
            "        break\n"
            "    time.sleep(0.02)\n"
            "assert running()\n" + ADD)


BACKGROUND = {
    "Popen in its own session": ("def spawn():\n    import subprocess\n    subprocess.Popen("
                                 "[sys.executable, '-c', SLEEP, MARKER], start_new_session=True)\n"),
    "double fork": ("def spawn():\n    if os.fork() == 0:\n        os.setsid()\n        if os.fork() == 0:\n"
                    "            os.execv(sys.executable, [sys.executable, '-c', SLEEP, MARKER])\n"
                    "        os._exit(0)\n"),
}


@pytest.mark.multiprocess
@pytest.mark.parametrize("how", list(BACKGROUND))
def test_no_process_outlives_the_call(how, sandboxed):
    marker = f"fewchips-test-{uuid.uuid4().hex}"
    assert code_tests(BACKGROUND[how] + _sleeper(marker), TESTS) == 1.0      # it ran, and they with it
    assert _running(marker) == []


@pytest.mark.multiprocess
def test_a_process_left_in_the_group_is_killed_without_the_sandbox(mode):
    marker = f"fewchips-test-{uuid.uuid4().hex}"
    spawn = "def spawn():\n    import subprocess\n    subprocess.Popen([sys.executable, '-c', SLEEP, MARKER])\n"
    assert code_tests(spawn + _sleeper(marker), TESTS, **mode) == 1.0
    assert _running(marker, settle=1.0 if mode else 0.0) == []      # unsafe: the kill is not waited for


@pytest.mark.multiprocess
def test_a_child_holding_the_pipes_does_not_stall_the_call(mode):
    """A forked child keeps every pipe the harness holds open and sleeps: the report still comes at once,
    and a harness that exits without one is not waited for past its own end."""
    marker = f"fewchips-test-{uuid.uuid4().hex}"
    hold = ("import os, sys\nif os.fork() == 0:\n"
            f"    os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(30)', {marker!r}])\n")
    t0 = time.monotonic()
    assert code_tests(hold + ADD, TESTS, **mode) == 1.0
    assert code_tests(hold + "import time\ntime.sleep(0.3)\nos._exit(0)", TESTS, **mode) == 0.0
    assert time.monotonic() - t0 < 4
    assert _running(marker, settle=1.0 if mode else 0.0) == []


@pytest.mark.multiprocess
def test_the_network_is_unreachable(sandboxed):
    """`socket` and the `_socket` under it, to a port listening on this machine: no connection, no byte."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.5)
        port = server.getsockname()[1]
        reach = ("import socket, _socket\n"
                 "try:\n"
                 f"    socket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'leak')\n"
                 "except OSError:\n    pass\n"
                 "try:\n"
                 "    s = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)\n"
                 f"    s.settimeout(2)\n    s.connect(('127.0.0.1', {port}))\n    s.send(b'leak')\n"
                 "except OSError:\n    pass\n")
        assert code_tests(reach + ADD, TESTS) == 1.0
        with pytest.raises(socket.timeout):
            server.accept()


@pytest.mark.multiprocess
def test_nothing_is_written_outside_the_folder_and_the_folder_goes(sandboxed, tmp_path):
    leak = tmp_path / "leak.txt"
    write = (f"import os\nfor path in ({str(leak)!r}, os.path.expanduser('~/../fewchips-leak.txt')):\n"
             "    try:\n        open(path, 'w').write('x' * 100)\n    except OSError:\n        pass\n"
             "open('inside.txt', 'w').write('the working folder is writable')\n")
    assert code_tests(write + ADD, TESTS) == 1.0
    assert not leak.exists()
    assert not glob.glob(os.path.join(tempfile.gettempdir(), "fewchips-reward-*"))


@pytest.mark.multiprocess
def test_an_endless_loop_ends_at_its_cpu_limit(mode):
    t0 = time.monotonic()
    assert code_tests("def add(a, b):\n    while True:\n        pass", TESTS, cpu_s=1, **mode) == 0.0
    assert time.monotonic() - t0 < 5                         # the CPU limit, not the wall-clock deadline (7 s)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_a_sleeping_completion_ends_at_the_deadline_with_everything_it_started(sandboxed):
    marker = f"fewchips-test-{uuid.uuid4().hex}"
    t0 = time.monotonic()
    sleeps = BACKGROUND["double fork"] + _sleeper(marker) + "time.sleep(60)\n"
    assert code_tests(sleeps, TESTS, cpu_s=1) == 0.0
    assert time.monotonic() - t0 < 10                        # 2 x cpu_s + 5
    assert _running(marker) == []


@pytest.mark.multiprocess
def test_without_a_pid_namespace_the_sandbox_still_isolates_and_says_what_it_lacks(monkeypatch, tmp_path):
    if not R._sandbox().argv:
        pytest.skip(f"no sandbox here: {R._sandbox().why}")
    monkeypatch.setattr(R, "_FULL", ("-rnmpf", "--no-such-flag"))       # as where /proc cannot be mounted
    R._sandbox.cache_clear()
    try:
        assert code_sandbox().startswith("code reward: sandboxed without a PID namespace (unshare -rnmpf "
                                         "--no-such-flag fails here: ")
        leak = tmp_path / "leak.txt"
        escape = f"try:\n    open({str(leak)!r}, 'w').write('x')\nexcept OSError:\n    pass\n"
        assert code_tests(escape + ADD, TESTS) == 1.0 and not leak.exists()
        assert code_tests(EXPLOITS["os._exit(0)"], TESTS) == 0.0
    finally:
        R._sandbox.cache_clear()


# ---- code: no sandbox, no run (unless asked) ---------------------------------------------------

@pytest.fixture
def no_unshare(tmp_path, monkeypatch):
    """PATH without unshare, the sandbox probed again (and again after the test)."""
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    R._sandbox.cache_clear()
    yield
    R._sandbox.cache_clear()


@pytest.mark.multiprocess
def test_without_a_sandbox_the_code_reward_refuses_unless_opted_in(no_unshare, tmp_path, capsys):
    with pytest.raises(TrainError, match=r"cannot sandbox it here \(no unshare on PATH\); pass --unsafe-code-reward"):
        code_tests(ADD, TESTS)
    assert code_tests(ADD, TESTS, unsafe=True) == 1.0
    assert code_sandbox(unsafe=True).startswith("code reward: NOT sandboxed (--unsafe-code-reward; no unshare on PATH)")
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "add", "tests": TESTS}) + "\n")
    for name in ("code", "code-fraction"):
        with pytest.raises(TrainError, match="--unsafe-code-reward"):
            load_task(name, str(f))
        messages, row = load_task(name, str(f), unsafe_code=True).sample(random.Random(0))
        assert load_task(name, str(f), unsafe_code=True).reward(messages, ADD, row) == 1.0
    from fewchips.cli import main
    for argv in (["sample", "--reward", "code", "--out", str(tmp_path / "kept.jsonl")],
                 ["grpo", "--task", "code", "--out", str(tmp_path / "run")]):
        assert main([*argv, "--model", str(tmp_path / "no-model"), "--prompts", str(f)]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "no unshare on PATH" in err[0] and "--unsafe-code-reward" in err[0], err


@pytest.mark.multiprocess
def test_the_sandbox_in_use_is_said_once_at_the_start(sandboxed, tmp_path, capsys):
    line = code_sandbox()
    assert line.startswith("code reward: sandboxed (unshare -rnmpf") and "\n" not in line
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "add", "tests": TESTS}) + "\n")
    from fewchips.cli import main
    main(["sample", "--reward", "code", "--prompts", str(f), "--model", str(tmp_path / "no-model"),
          "--out", str(tmp_path / "kept.jsonl")])
    assert capsys.readouterr().err.splitlines()[0] == line                   # then the missing model
