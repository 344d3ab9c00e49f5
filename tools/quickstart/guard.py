"""What keeps a quickstart alone on its OUT and takes its children down with it: a lock file
holding the owner's PID, and training children that die when the quickstart dies (however it
dies: kill -9 by an OOM killer or a scheduler leaves no chance to clean up)."""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import subprocess
from contextlib import contextmanager
from pathlib import Path

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with(parent: int):
    """preexec_fn of a child: the kernel sends it SIGKILL when `parent` exits (Linux). SIGKILL,
    not SIGTERM: a training child's checkpoints are atomic, so nothing it leaves is half-written,
    and no handler of the child (Lightning installs some) can delay it."""

    def arm() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):  # not Linux: the child outlives a killed parent
            return
        if os.getppid() != parent:  # the parent died before the signal was armed
            os._exit(1)

    return arm


def run_child(command: list[str], env: dict) -> int:
    """Run `command` to its end and return its exit status; it is killed if this process dies."""
    return subprocess.run(command, env=env, preexec_fn=_die_with(os.getpid())).returncode


class Busy(ValueError):
    """Another live quickstart owns OUT (a ValueError: `vidistill quickstart` says it in one line)."""


@contextmanager
def owned(root: Path):
    """Hold OUT/quickstart.lock for the duration: refused while another live process holds it;
    the kernel drops a lock with its holder, so a killed owner's lock is taken over. The file
    keeps the owner's PID for the message (and for a person looking)."""
    import fcntl

    path = root / "quickstart.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise Busy(
                f"{root} is in use by another quickstart (PID {owner}, {path}); wait for it or give another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays (an unlocked file is free)
