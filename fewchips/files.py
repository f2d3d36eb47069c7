"""Files that are never half-written, and one writer per output folder.

Every output (weights, configs, tokenizers, plots, checkpoints) is written to a temporary name beside
its destination and renamed into place: a crash or a full disk leaves the previous version whole.
Temporary files get the permissions an ordinary `open` would give (0666 minus the umask), not
mkstemp's private 0600, so the result is readable by whoever could read the folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
import time


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _umask()


@contextlib.contextmanager
def atomic_path(dest, suffix: str = ""):
    """Yields a temporary path beside `dest`; write it, and on leaving the block it replaces `dest`.
    On an exception it is removed and `dest` is left as it was."""
    dest = os.fspath(dest)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(dest)), prefix=".tmp-", suffix=suffix)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~UMASK)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(dest, text: str):
    with atomic_path(dest) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def temp_dir_beside(dest) -> str:
    """A fresh directory next to `dest` (same filesystem, so `swap_dir` is a rename)."""
    dest = os.path.abspath(os.fspath(dest))
    tmp = tempfile.mkdtemp(dir=os.path.dirname(dest), prefix=f".{os.path.basename(dest)}.tmp-")
    os.chmod(tmp, 0o777 & ~UMASK)
    return tmp


def swap_dir(tmp, dest, keep_previous: bool = False):
    """Put the finished directory `tmp` at `dest` by renames: the old `dest` becomes `dest.old` first,
    so at every instant one complete version exists under one of the two names. `keep_previous`
    leaves it there (a fallback if the new one is later found damaged); otherwise it is removed."""
    dest = os.fspath(dest)
    old = dest + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(dest):
        os.replace(dest, old)
    os.replace(tmp, dest)
    if not keep_previous:
        shutil.rmtree(old, ignore_errors=True)


class FolderLockedError(RuntimeError):
    pass


class FolderLock:
    """FOLDER/.lock holding the writer's host and PID. A second writer is refused; a lock whose process
    has died (on this host) is taken over, as is one this process already holds."""

    def __init__(self, folder):
        self.path = os.path.join(os.fspath(folder), ".lock")
        self.held = False

    def acquire(self) -> "FolderLock":
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and self._alive(holder):
                    folder = os.path.dirname(self.path)
                    raise FolderLockedError(
                        f"{folder} is being written by process {holder.get('pid')} on {holder.get('host')} "
                        f"(since {holder.get('since')}); wait for it to end or choose another --out. If no such "
                        f"process runs, delete {self.path}") from None
                with contextlib.suppress(FileNotFoundError):
                    os.remove(self.path)          # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise FolderLockedError(f"could not take {self.path}: another process keeps recreating it")

    def release(self):
        if self.held:
            holder = self._holder()
            if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
                with contextlib.suppress(FileNotFoundError):
                    os.remove(self.path)
            self.held = False

    def _holder(self) -> dict | None:
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None                           # unreadable or half-written: treat as stale

    @staticmethod
    def _alive(holder: dict) -> bool:
        pid = holder.get("pid")
        if holder.get("host") != socket.gethostname():
            return True                           # cannot check another machine's processes
        if pid == os.getpid() or not isinstance(pid, int):
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
