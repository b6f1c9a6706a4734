"""Every thread stor starts, named for the operating system too.

Python 3.11 names a thread for itself only: `top -H`, `ps -L` and `/proc/<pid>/task/*/comm` show
each one as `python`. Started here, a thread carries its name (cut to the kernel's 15 bytes) there
as well, so an operator sees which pool grew or which thread spins, and a test can tell a pool
growing to its bound from a leak. (`prctl` is called here rather than through `backends.syscalls`,
which every layer may not import.)
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

_PR_SET_NAME = 15  # linux/prctl.h
_NAME_BYTES = 15  # TASK_COMM_LEN less its NUL
_prctl: Callable[..., int] | None = getattr(ctypes.CDLL(None), "prctl", None)  # None: not Linux


def name_for_os() -> None:
    """Give the calling thread's Python name to the operating system (best effort)."""
    if _prctl is not None:
        _prctl(_PR_SET_NAME, threading.current_thread().name.encode()[:_NAME_BYTES], 0, 0, 0)


def start_thread(target: Callable[[], object], name: str) -> threading.Thread:
    """A daemon thread named `name` running `target`, started."""

    def run() -> None:
        name_for_os()
        target()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread


def thread_pool(threads: int, prefix: str) -> ThreadPoolExecutor:
    """An executor of at most `threads` threads named `<prefix>_<n>`."""
    return ThreadPoolExecutor(threads, thread_name_prefix=prefix, initializer=name_for_os)
