"""Small facts about other processes, shared by the modules that need them."""

from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """Is there a process with this pid (ours or not: EPERM means it exists)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
