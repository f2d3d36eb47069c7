"""Rule-based rewards (DeepSeek-V3 §5.2.1: a math problem's final answer checked by rule, code checked
by running tests), each `(completion, field of the prompt's row) -> float`.

    math_answer    the completion's final answer, in the designated format (the last \\boxed{...}, or a
                   "Final answer:" line), equals the row's `answer` as mathematics (math-verify: 1/2 =
                   0.5 = \\frac{2}{4}); no answer in that format scores 0, whatever numbers the text holds
    code_tests     the completion's code (its first ``` block, else all of it) run, then the row's
                   `tests` one top-level statement at a time: 1.0 when every test passes, or the share
                   that pass (fraction=True). Each top-level `assert` is a test; every other statement must
                   run without error (else 0); tests without a top-level assert are one test.

The code reward's harness, and what it stands up to. The child is a small Python harness (`_HARNESS`): it
reads and deletes the code and the tests from its fresh folder, sets its limits, binds every name it uses
later (os.write, exec, BaseException), runs the code, then the tests one statement at a time, each in a
try. Only then does it write "R" on a pipe the parent gave it; the parent answers on a second pipe with a
random token made for this call, and the harness reports "passed total token". That report is the
reward: not the exit status, not the output (stdout and stderr go to /dev/null). So os._exit(0),
sys.exit(0), raising SystemExit, atexit hooks, killing itself, a replaced sys.exit/os._exit/builtins.exec
or a printed result line all score 0, and the token is not in the child before every test has run.
Not covered: the tests call the completion's code in the same interpreter, so code written against this
harness can still forge a report (write "R" on the pipe itself, or rewrite the harness's frame through a
tracer or ctypes), or return an object equal to everything. Judging the tests' values in a process the
completion never ran in would close that; it is not done.

Containment: `unshare -rnmpf --mount-proc --kill-child`: user, network (a loopback that is down), mount and
PID namespaces; every mount read-only but the fresh folder (removed after); the harness a child of a small
shell that is the namespace's init, so that killing the shell ends every process in the namespace, whatever
session or group they moved to; a process count inside the namespace, CPU seconds, memory and file size
limited. The call kills the namespace when the report is in or at the wall-clock deadline, and reads at
most 4 KiB, with that deadline, from the one pipe it reads, so a child holding a pipe cannot stall it.
Where /proc cannot be mounted it runs without the PID namespace (`unshare -rnm`; killed by process group,
so a process that calls setsid outlives the call). Where no namespace can be made the code reward refuses,
naming why and the opt-in (`--unsafe-code-reward`, `unsafe=True`), which leaves only the limits and the
process group. `code_sandbox` says in one line which is in use.

A user's reward is `module:function`; it is called with the prompt, the completion and every field of the
prompt's row its signature names (or all of them, given **kwargs), as TRL passes dataset columns.
"""

from __future__ import annotations

import ast
import functools
import inspect
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

from .config import TrainError

_FENCE = re.compile(r"```[^\n]*\n(.*?)```", re.S)
_FINAL_LINE = re.compile(r"final answer\s*[:：]\s*(.*?)\s*$", re.I | re.M)
ANSWER_FORMATS = ("boxed", "final_line")


# ---- math -------------------------------------------------------------------------------------

def boxed(text: str) -> str | None:
    """The contents of the last \\boxed{...} (braces nested to any depth), or None."""
    found = None
    for m in re.finditer(r"\\boxed\s*\{", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            found = text[m.end():i - 1]
    return found


def final_answer(text: str, answer_format: str = "boxed") -> str | None:
    """The completion's final answer in the designated format: the last \\boxed{...}, or the rest of the
    last "Final answer:" line; None when it gives none."""
    if answer_format == "boxed":
        return boxed(text)
    if answer_format == "final_line":
        lines = _FINAL_LINE.findall(text)
        return lines[-1].rstrip(".") if lines else None
    raise ValueError(f"answer_format must be one of {', '.join(ANSWER_FORMATS)}, got {answer_format!r}")


def math_answer(completion: str, answer, answer_format: str = "boxed", where: str | None = None) -> float:
    """1.0 when the completion's final answer (see `final_answer`) equals `answer` mathematically. A gold
    answer math-verify cannot parse stops the run, naming `where` (the row)."""
    try:
        from math_verify import parse, verify
    except ImportError:
        raise TrainError("the math reward needs math-verify: pip install math-verify") from None
    gold = parse(str(answer)) or parse(f"${answer}$")       # LaTeX without its $...$ too
    if all(isinstance(g, str) for g in gold):                # no expression, at most the text back
        raise TrainError(f"{where or 'a prompt row'}: math-verify cannot parse its answer {str(answer)[:60]!r} "
                         f"(a number, a fraction, LaTeX such as \\frac{{1}}{{2}}), so no completion could match it")
    given = final_answer(completion, answer_format)
    if given is None or not given.strip():
        return 0.0
    pred = parse(f"${given}$" if answer_format == "boxed" else given)
    return float(bool(pred) and verify(gold, pred))


# ---- code -------------------------------------------------------------------------------------

def code_of(completion: str) -> str:
    """The code in a completion: its first fenced block, else the whole text."""
    m = _FENCE.search(completion)
    return m.group(1) if m else completion


def count_tests(tests: str) -> int:
    """How many tests `tests` holds: its top-level asserts, or 1 when it has none."""
    try:
        body = ast.parse(tests).body
    except SyntaxError as e:
        raise ValueError(f"the row's tests are not Python ({e.msg}, line {e.lineno})") from None
    return sum(isinstance(s, ast.Assert) for s in body) or 1


# The child (`python -I -S -c _HARNESS RES TOK NPROC CPU_S MEMORY_MB FILE_MB`). Trusted until the completion's
# code runs: everything it uses after that is bound first. It exits without a report when the code does not
# compile or raises; a non-assert test statement that raises makes the report 0.
_HARNESS = r"""
import ast, builtins, os, resource, sys

def main(res, tok, nproc, cpu_s, memory_mb, file_mb):
    write, read, exit_, exec_, Error = os.write, os.read, os._exit, builtins.exec, BaseException
    with open("solution.py", encoding="utf-8") as f:
        code = f.read()
    with open("tests.py", encoding="utf-8") as f:
        tests = f.read()
    os.unlink("solution.py")
    os.unlink("tests.py")
    try:
        solution = compile(code, "solution.py", "exec", dont_inherit=True)
    except Exception:
        exit_(1)
    steps = [(isinstance(s, ast.Assert), compile(ast.Module([s], []), "tests.py", "exec", dont_inherit=True))
             for s in ast.parse(tests).body]
    total = sum(t for t, _ in steps)
    limits = [(resource.RLIMIT_CPU, cpu_s), (resource.RLIMIT_AS, memory_mb << 20),
              (resource.RLIMIT_FSIZE, file_mb << 20), (resource.RLIMIT_CORE, 0)]
    for which, n in limits + ([(resource.RLIMIT_NPROC, nproc)] if nproc else []):
        resource.setrlimit(which, (n, n))
    module = type(sys)("__main__")
    sys.modules["__main__"] = module
    try:
        exec_(solution, module.__dict__)
    except Error:
        exit_(1)
    passed, broken = 0, False
    for is_test, step in steps:
        try:
            exec_(step, module.__dict__)
            ok = True
        except Error:
            ok = False
        passed += is_test and ok
        broken = broken or not (is_test or ok)
    if not total:
        passed, total = int(not broken), 1
    elif broken:
        passed = 0
    write(res, b"R\n")
    write(res, b"%d %d " % (passed, total) + read(tok, 64))
    exit_(0)

main(*map(int, sys.argv[1:]))
"""

# Inside the namespaces: every mount read-only but the working folder (entered again: the bind mount covers
# the folder the shell started in), then the harness as a child of this shell (no exec: the shell, which runs
# nothing of the completion's, stays the namespace's init).
_SANDBOX = ('W="$1"; shift; mount --bind "$W" "$W" && cd "$W" || exit 97; '
            'while read -r _ m _; do [ "$m" = "$W" ] || mount -o remount,bind,ro "$m" 2>/dev/null; done '
            '< /proc/self/mounts; "$@"; exit $?')
_FULL, _NO_PIDS = ("-rnmpf", "--mount-proc", "--kill-child"), ("-rnm",)    # the second where /proc cannot be mounted
MAX_PROCESSES = 32            # tasks (processes and threads) inside the namespace, the harness and its shell included
_REPORT_BYTES = 4096


class Sandbox(NamedTuple):
    argv: tuple[str, ...]     # the prefix that runs a program in the sandbox; () where none can be made
    flags: tuple[str, ...]    # unshare's
    why: str                  # why the full sandbox cannot be made here ("" where it can)

    @property
    def pids(self) -> bool:   # a PID namespace: killing its init (the shell) ends every process in it
        return self.flags == _FULL


def _probe(exe: str, flags: tuple[str, ...]) -> str:
    """Why `unshare flags` cannot run the sandbox's shell here, or ""."""
    work = tempfile.mkdtemp(prefix="fewchips-reward-")
    try:
        p = subprocess.run([exe, *flags, "sh", "-c", _SANDBOX, "sh", work, "true"], capture_output=True, text=True,
                           timeout=10)
        return "" if p.returncode == 0 else (p.stderr.strip().splitlines() or [f"exit status {p.returncode}"])[-1]
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    finally:
        shutil.rmtree(work, ignore_errors=True)


@functools.cache
def _sandbox() -> Sandbox:
    exe = shutil.which("unshare")
    if exe is None:
        return Sandbox((), (), "no unshare on PATH")
    why = _probe(exe, _FULL)
    if why:
        why = f"unshare {' '.join(_FULL)} fails here: {why}"
        if _probe(exe, _NO_PIDS):
            return Sandbox((), (), why)
    flags = _NO_PIDS if why else _FULL
    return Sandbox((exe, *flags, "sh", "-c", _SANDBOX, "sh"), flags, why)


def code_sandbox(unsafe: bool = False) -> str:
    """One line saying how the code reward runs completions here; refuses (TrainError) where no sandbox
    can be made and `unsafe` is not given."""
    box = _sandbox()
    limits = "CPU, memory and file-size limits"
    if box.pids:
        return (f"code reward: sandboxed (unshare {' '.join(box.flags)}: user, network, mount and PID namespaces; "
                f"files read-only but a fresh folder; at most {MAX_PROCESSES} processes; {limits})")
    if box.argv:
        return (f"code reward: sandboxed without a PID namespace ({box.why}; unshare {' '.join(box.flags)}: user, "
                f"network and mount namespaces; files read-only but a fresh folder; at most {MAX_PROCESSES} "
                f"processes; {limits}): a process that leaves its group can outlive the call")
    if not unsafe:
        raise TrainError(f"the code reward runs model-written code and cannot sandbox it here ({box.why}); "
                         f"pass --unsafe-code-reward (code_tests(unsafe=True)) to run it with only {limits} and "
                         f"a process group")
    return (f"code reward: NOT sandboxed (--unsafe-code-reward; {box.why}): completions can read your files and "
            f"reach the network, and a process that leaves its group outlives the call; {limits} only")


def code_tests(completion: str, tests: str, cpu_s: int = 5, memory_mb: int = 1024, fraction: bool = False,
               unsafe: bool = False) -> float:
    """1.0 when the completion's code, then every test of `tests`, runs within the limits (fraction: the
    share of the tests that pass). See the module's docstring for the harness and the sandbox."""
    total = count_tests(tests)
    code_sandbox(unsafe)                                 # refuses where no sandbox can be made, unless unsafe
    work = tempfile.mkdtemp(prefix="fewchips-reward-")
    try:
        for name, text in (("solution.py", code_of(completion)), ("tests.py", tests)):
            with open(os.path.join(work, name), "w", encoding="utf-8") as f:
                f.write(text)
        passed = _run(_sandbox(), work, total, cpu_s, memory_mb)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return passed / total if fraction else float(passed == total)


def _run(box: Sandbox, work: str, total: int, cpu_s: int, memory_mb: int) -> int:
    """Start the harness, hand it the token when it asks, read its report; kill everything it started."""
    token = secrets.token_hex(16).encode()
    res_r, res_w = os.pipe()
    tok_r, tok_w = os.pipe()
    # a process count only in a user namespace (outside, it counts every process of the user); no file
    # may get a byte outside the sandbox
    harness = [sys.executable, "-I", "-S", "-c", _HARNESS, str(res_w), str(tok_r),
               str(MAX_PROCESSES if box.argv else 0), str(cpu_s), str(memory_mb), str(16 if box.argv else 0)]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONDONTWRITEBYTECODE": "1", "HOME": work}
    try:
        proc = subprocess.Popen([*box.argv, work, *harness] if box.argv else harness, cwd=work, env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                pass_fds=(res_w, tok_r), start_new_session=True)
    except BaseException:
        for fd in (res_r, res_w, tok_r, tok_w):
            os.close(fd)
        raise
    os.close(res_w)
    os.close(tok_r)
    try:
        report = _read_report(proc, res_r, tok_w, token, time.monotonic() + 2 * cpu_s + 5)
    finally:
        _end(proc, in_namespace=box.pids)
        os.close(res_r)
        os.close(tok_w)
    lines = report.split(b"\n")
    fields = lines[1].split() if len(lines) == 3 and lines[0] == b"R" and lines[2] == b"" else []
    if len(fields) != 3 or fields[2] != token or not all(f.isdigit() for f in fields[:2]):
        return 0
    passed, told = int(fields[0]), int(fields[1])
    return passed if told == total and passed <= total else 0


def _read_report(proc, res_r: int, tok_w: int, token: bytes, deadline: float) -> bytes:
    """The harness's two lines, read until they are whole, the child is gone, the deadline passes or 4 KiB
    came; the token goes out once "R" has come in."""
    report, asked = b"", False
    pipe = select.poll()                # not select(): a trainer's descriptors may be numbered past 1024
    pipe.register(res_r, select.POLLIN)
    while len(report) <= _REPORT_BYTES and report.count(b"\n") < 2:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        if not pipe.poll(min(left, 0.05) * 1000):
            if proc.poll() is not None and not pipe.poll(0):
                break                 # gone, and all it wrote is read (a grandchild may hold the pipe open)
            continue
        chunk = os.read(res_r, _REPORT_BYTES)
        if not chunk:
            break
        report += chunk
        if not asked and report.startswith(b"R\n"):
            asked = True
            try:
                os.write(tok_w, token + b"\n")
            except OSError:           # the harness is gone
                break
    return report


def _end(proc, in_namespace: bool):
    """Kill what the call started and reap it. In the namespace: its init (the shell), whose death takes
    every process in the namespace with it; unshare then exits once they are gone. Else the process group."""
    if in_namespace and proc.poll() is None:
        inits = _children(proc.pid)
        for pid in inits:
            _kill(os.kill, pid)
        try:
            if inits:
                proc.wait(timeout=5)
                return
        except subprocess.TimeoutExpired:
            pass
    _kill(os.killpg, proc.pid)                  # its own session: the group is its pid
    proc.wait()


def _kill(how, pid: int):
    try:
        how(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (from /proc: no per-task children file on every kernel)."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(b")", 1)[1].split()[1]) == pid:
                out.append(int(name))
    return out


def call_with_fields(fn, prompt: str, completion: str, fields: dict):
    """fn(prompt, completion, **the row's fields its signature takes)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):                # a builtin without a signature: the two arguments
        return fn(prompt, completion)
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return fn(prompt, completion, **fields)
    return fn(prompt, completion, **{k: v for k, v in fields.items() if k in params})
