"""A command's one error line, on stderr and, under torchrun, in the worker's error file: torchrun's
failure summary (the `ChildFailedError` it prints after a worker exits non-zero) then shows this line as
the cause in place of "To enable traceback see ..." (torch.distributed.elastic reads the file named by
TORCHELASTIC_ERROR_FILE, which it sets for every worker)."""

from __future__ import annotations

import json
import os
import sys
import time


def say_error(command: str, message, show: bool = True) -> None:
    """`fewchips COMMAND: error: MESSAGE` on stderr (unless another rank says it), and for torchrun."""
    line = f"fewchips {command}: error: {message}"
    if show:
        print(line, file=sys.stderr)
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        try:
            with open(path, "w") as f:
                json.dump({"message": line, "timestamp": int(time.time())}, f)
        except OSError:                            # the summary then says what torchrun says without it
            pass
