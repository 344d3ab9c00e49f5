"""A fork server for `vidistill` runs in tests: one process imports torch, Lightning,
transformers and the suite once (10-25 s on a small CI machine) and forks a fresh child for each
run, which starts training at once. The server itself never computes anything, so no thread
pool (OpenMP, OpenCV) exists at fork time and children are as clean as a new interpreter.

A child is a real process: SIGKILL and SIGUSR1 reach it as they would reach `vidistill fit`;
it runs `tools.cli.main(argv)` with its own environment, stdout/stderr to a log file, and its
exit status (negative: killed by that signal) is written by the server to `<log>.rc`.

    with Zygote() as z:
        run = z.start(["fit", "--config", "r.yaml"], log="run.log", env={"X": "1"})
        run.wait(300)  # -> exit status
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.helpers import PATIENCE_S

ROOT = Path(__file__).resolve().parents[2]


class Run:
    """One forked run: its pid, log and exit status."""

    def __init__(self, pid: int, log: Path):
        self.pid, self.log = pid, Path(log)

    def done(self) -> bool:
        return Path(f"{self.log}.rc").is_file()

    def wait(self, timeout: float = PATIENCE_S) -> int:
        end = time.monotonic() + timeout
        rc = Path(f"{self.log}.rc")
        while not rc.is_file():
            if time.monotonic() > end:
                os.kill(self.pid, 9)
                raise TimeoutError(f"run {self.pid} did not end within {timeout} s:\n{self.output()}")
            time.sleep(0.05)
        time.sleep(0.02)  # the status file is written whole before it is renamed in
        return int(rc.read_text())

    def output(self) -> str:
        return self.log.read_text()[-8000:] if self.log.is_file() else ""


class Zygote:
    """Client side: starts the server and asks it for runs."""

    def __init__(self):
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.helpers.zygote"],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout.readline().strip() == "ready"

    def start(self, argv: list[str], log: str | Path, env: dict | None = None) -> Run:
        Path(f"{log}.rc").unlink(missing_ok=True)
        self.proc.stdin.write(
            json.dumps(
                {"argv": [str(a) for a in argv], "log": str(log), "env": {k: str(v) for k, v in (env or {}).items()}}
            )
            + "\n"
        )
        self.proc.stdin.flush()
        return Run(int(self.proc.stdout.readline()), Path(log))

    def run(self, argv, log, env=None, timeout: float = PATIENCE_S) -> tuple[int, str]:
        r = self.start(argv, log, env)
        return r.wait(timeout), r.output()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(PATIENCE_S)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --------------------------------------------------------------------------------------------
# server side
# --------------------------------------------------------------------------------------------


def _child(req: dict) -> None:
    """In the forked child: become one `vidistill` run and never return."""
    code = 1
    try:
        fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.environ.update(req["env"])
        sys.argv = ["vidistill"]  # the arguments go to main() (LightningCLI warns when both are given)
        from tools.cli import main

        main(req["argv"])
        code = 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 - reported in the log, status 1
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _reap(logs: dict[int, str], lock: threading.Lock) -> None:
    """Write each child's exit status to `<log>.rc` (via a rename, so it is read whole)."""
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            time.sleep(0.05)
            continue
        with lock:
            log = logs.pop(pid, None)
        if log is not None:
            rc = os.waitstatus_to_exitcode(status)
            Path(f"{log}.rc.tmp").write_text(str(rc))
            os.replace(f"{log}.rc.tmp", f"{log}.rc")


def serve() -> None:
    # everything a run imports, imported once here; nothing is computed
    import lightning  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import datamodules.video  # noqa: F401
    import modules.stages.control_training  # noqa: F401
    import modules.stages.dmd2  # noqa: F401
    import modules.stages.kd_warmup  # noqa: F401
    import tests.helpers.faults  # noqa: F401
    import tools.cli  # noqa: F401
    import tools.infer  # noqa: F401
    import trainers.cli  # noqa: F401

    logs: dict[int, str] = {}
    lock = threading.Lock()
    print("ready", flush=True)
    reaper = None
    for line in sys.stdin:
        req = json.loads(line)
        with lock:  # the reaper must not see the child before its log is known
            pid = os.fork()
            if pid == 0:
                _child(req)
            logs[pid] = req["log"]
        print(pid, flush=True)
        if reaper is None:  # fork copies only the calling thread: children never run the reaper
            reaper = threading.Thread(target=_reap, args=(logs, lock), daemon=True)
            reaper.start()


if __name__ == "__main__":
    serve()
