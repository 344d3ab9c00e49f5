"""A quickstart killed as a cluster kills it (kill -9 of its own PID) takes its training child
down with it, and a second quickstart on the same OUT is refused while the first lives; the
lock of a dead one is taken over."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import PATIENCE_S
from tools.quickstart.guard import Busy, owned

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


def alive(pid: int) -> bool:
    """Running (a zombie waiting for init to reap it counts as dead)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def children(pid: int, word: str = "") -> list[int]:
    """The processes whose parent is `pid` (and whose command line holds `word`)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[1]) == pid and (not word or word.encode() in (stat.parent / "cmdline").read_bytes().split(b"\0")):
            found.append(int(stat.parent.name))
    return found


def wait_for(condition, seconds: float, what: str):
    # generous: CI machines under load take long to import torch and Lightning
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"no {what} within {seconds} s")


def quickstart(out: Path, **kw) -> subprocess.Popen:
    command = [sys.executable, "-m", "tools.cli", "quickstart", "--out", str(out), "--budget", "smoke"]
    return subprocess.Popen(command, env=ENV, cwd=ROOT, **kw)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal and /proc are Linux's")
def test_a_killed_quickstart_takes_its_child_along_and_a_second_is_refused(tmp_path):
    out = tmp_path / "qs"
    first = quickstart(out, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        child = wait_for(lambda: children(first.pid, "fit"), PATIENCE_S, "training child")[0]
        second = quickstart(out, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _, err = second.communicate(timeout=PATIENCE_S)
        assert second.returncode == 1, err
        assert err.strip().splitlines() == [
            f"vidistill quickstart: error: {out} is in use by another quickstart (PID {first.pid}, "
            f"{out / 'quickstart.lock'}); wait for it or give another --out"
        ]
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        wait_for(lambda: not alive(child), 60, "end of the orphaned child")
    finally:
        first.kill()
        for pid in children(first.pid):
            os.kill(pid, signal.SIGKILL)
    with owned(out):  # the dead owner's lock is free
        assert (out / "quickstart.lock").read_text() == f"{os.getpid()}\n"
        with pytest.raises(Busy):  # and held again, even against this process's second open
            with owned(out):
                pass
