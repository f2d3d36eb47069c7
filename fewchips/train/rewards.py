"""Rule-based rewards (DeepSeek-V3 §5.2.1: a math problem's final answer checked by rule, code checked
by running tests), each `(completion, field of the prompt's row) -> float`.

    math_answer    the completion's answer equals the row's `answer` as mathematics (math-verify:
                   1/2 = 0.5 = \\frac{2}{4}), not as text
    code_tests     the completion's code (its first ``` block, else all of it) followed by the row's
                   `tests` exits 0 in a limited subprocess: CPU seconds, memory, a fresh working folder
                   (removed after) the only writable place, no network (user, network and mount
                   namespaces where the system allows them; else a disabled socket module and no file
                   may get a byte)

A user's reward is `module:function`; it is called with the prompt, the completion and every field of the
prompt's row its signature names (or all of them, given **kwargs), as TRL passes dataset columns.
"""

from __future__ import annotations

import functools
import inspect
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile

from .config import TrainError

_FENCE = re.compile(r"```[^\n]*\n(.*?)```", re.S)


def math_answer(completion: str, answer: str) -> float:
    """1.0 when the completion's final answer equals `answer` mathematically."""
    try:
        from math_verify import parse, verify
    except ImportError:
        raise TrainError("the math reward needs math-verify: pip install math-verify") from None
    gold, pred = parse(str(answer)), parse(completion)
    return float(bool(gold) and bool(pred) and verify(gold, pred))


def code_of(completion: str) -> str:
    """The code in a completion: its first fenced block, else the whole text."""
    m = _FENCE.search(completion)
    return m.group(1) if m else completion


# the child's first lines when no namespace is available: no socket can be made
_NO_SOCKETS = ("import socket as _s\n"
               "def _refused(*a, **k):\n    raise OSError('network disabled in the code reward')\n"
               "_s.socket = _s.create_connection = _s.socketpair = _refused\n")

# Inside `unshare -rnm` (an unprivileged user, network and mount namespace: no network but a loopback
# that is down): every mount read-only but the working folder, then the program.
_SANDBOX = ('W="$1"; shift; mount --bind "$W" "$W" || exit 97; '
            'while read -r _ m _; do [ "$m" = "$W" ] || mount -o remount,bind,ro "$m" 2>/dev/null; done '
            '< /proc/self/mounts; exec "$@"')


@functools.cache
def _sandbox() -> tuple[str, ...]:
    """The argv prefix that runs a program in the sandbox, or () where namespaces are not allowed."""
    exe = shutil.which("unshare")
    if exe is None:
        return ()
    probe = tempfile.mkdtemp(prefix="fewchips-reward-")
    try:
        ok = subprocess.run([exe, "-rnm", "sh", "-c", _SANDBOX, "sh", probe, "true"], capture_output=True,
                            timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    finally:
        shutil.rmtree(probe, ignore_errors=True)
    return (exe, "-rnm", "sh", "-c", _SANDBOX, "sh") if ok else ()


def _limits(cpu_s: int, memory_mb: int, file_mb: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s))
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_mb << 20, file_mb << 20))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return apply


def code_tests(completion: str, tests: str, cpu_s: int = 5, memory_mb: int = 1024) -> float:
    """1.0 when the completion's code, then `tests`, runs to exit status 0 within the limits."""
    program = code_of(completion) + "\n\n" + tests + "\n"
    box = _sandbox()
    if not box:                    # no namespaces: no sockets, and no file may get a byte
        program = _NO_SOCKETS + program
    work = tempfile.mkdtemp(prefix="fewchips-reward-")
    try:
        path = os.path.join(work, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(program)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONDONTWRITEBYTECODE": "1", "HOME": work}
        argv = [*box, work, sys.executable, "-I", "-S", path] if box else [sys.executable, "-I", "-S", path]
        try:
            p = subprocess.run(argv, cwd=work, env=env, capture_output=True, timeout=2 * cpu_s + 5,
                               preexec_fn=_limits(cpu_s, memory_mb, 16 if box else 0), start_new_session=True)
        except subprocess.TimeoutExpired:         # asleep rather than computing: the wall clock ends it
            return 0.0
        return float(p.returncode == 0)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def call_with_fields(fn, prompt: str, completion: str, fields: dict):
    """fn(prompt, completion, **the row's fields its signature takes)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):                # a builtin without a signature: the two arguments
        return fn(prompt, completion)
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return fn(prompt, completion, **fields)
    return fn(prompt, completion, **{k: v for k, v in fields.items() if k in params})
