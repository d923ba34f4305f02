"""Whether a local process still runs: shared by segment sweeping and cache-lock takeover."""

from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """False for a pid that is gone or a zombie (exited, not yet reaped by its launcher)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False  # OverflowError: no such pid can exist
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        return True
