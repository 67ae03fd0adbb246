"""What procfs says about the processes behind requests (never enters FUSE)."""

import os
import time

_TGID: dict[int, tuple[int, float]] = {}
_TGID_TRUST = 2.0  # seconds: thread ids are reused, so an answer is trusted briefly


def tgid(pid: int) -> int:
    """The process a (possibly multi-threaded) requester belongs to."""
    now = time.monotonic()
    hit = _TGID.get(pid)
    if hit is not None and now - hit[1] < _TGID_TRUST:
        return hit[0]
    if len(_TGID) > 4096:
        _TGID.clear()
    found = _read_tgid(pid)
    _TGID[pid] = (found, now)
    return found


def _read_tgid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Tgid:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return pid


def holds_file(pid: int, path: str) -> bool:
    """Does process PID still have PATH open? (readlink only: never enters FUSE)"""
    fd_dir = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return False
    for fd in fds:
        try:
            # an invalidated name reads back as "PATH (deleted)"
            if os.readlink(f"{fd_dir}/{fd}").removesuffix(" (deleted)") == path:
                return True
        except OSError:
            pass
    return False


def open_fd_count(pid: int) -> int:
    """How many descriptors process PID has open: one stat, no listing
    (Linux 6.2+ gives the count as the size of /proc/PID/fd; 0 before, and
    for a process that is gone)."""
    try:
        return os.stat(f"/proc/{pid}/fd").st_size
    except OSError:
        return 0
