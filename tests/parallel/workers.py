"""torchrun's worker processes, found through /proc (Linux): what the kill and shutdown tests signal."""

import os


def child_with_rank(parent_pid: int, rank: int) -> int | None:
    """The pid of torchrun's worker with RANK=rank (Linux /proc)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if ppid == parent_pid and f"RANK={rank}".encode() in env:
            return int(pid)
    return None
