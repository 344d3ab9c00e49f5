"""The launch paths of recipes/launch/ and `fabric run`, on CPU: a real 2-node launch on one machine
(two node ranks, each one gloo process, a rendezvous on localhost) through recipes/launch/torchrun.sh,
one node killed with SIGKILL, both restarted with `fabric run --num-nodes 2 ... --ckpt_path last`:
the losses equal a 2-process single-node `fabric run`'s bitwise. slurm.sbatch runs with stub
`srun` / `scontrol` that record their command lines.

The recipe is the reliability tests' tiny control recipe (tests/helpers/reliability.py: the real
CLI, FSDP2 strategy, datamodule and atomic checkpoints; losses recorded per rank by Faults)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from tests.helpers import PATIENCE_S
from tests.helpers.faults import losses_by_step, read_record
from tests.helpers.reliability import recipe, video_shards

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = Path(sysconfig.get_path("scripts"))  # the console scripts (vidistill, fabric) as installed
STEPS, EVERY, KILL = 6, 2, 3
# seconds a collective waits: a rank stuck on a dead or diverged peer fails with a traceback (it
# was 90, which a rank of a loaded 2-core machine can take to reach a collective its peer is in)
STRATEGY = {
    "strategy": {"class_path": "trainers.strategy.FSDP2Strategy", "init_args": {"collective_timeout_s": PATIENCE_S}}
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment(**extra: str) -> dict[str, str]:
    # PYTHONPATH: the recipe's loss recorder (tests.helpers.faults) is no installed module
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, PATH=f"{SCRIPTS}:{os.environ['PATH']}", PYTHONPATH=path, PYTHONUNBUFFERED="1")
    return env | {"OMP_NUM_THREADS": "1", **extra}


def start(cmd: list[str], log: Path, env: dict) -> subprocess.Popen:
    """A launcher in its own session, so the test can kill it with every process it started."""
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
    )


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (torchrun starts its workers in sessions of their own, so
    killing the launcher's process group leaves them running)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_all(procs: list[subprocess.Popen]) -> None:
    """SIGKILL each launcher with every process it started."""
    for p in procs:
        for pid in [p.pid, *descendants(p.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        p.wait()


def tails(logs: list[Path], chars: int = 3000) -> str:
    return "\n".join(f"--- {log.name} (end) ---\n{log.read_text()[-chars:]}" for log in logs)


def finish(procs: list[subprocess.Popen], logs: list[Path], timeout: float = PATIENCE_S) -> None:
    """Wait for every launcher to exit with status 0; on a failure or after `timeout` seconds,
    kill them all and fail with the end of every log."""
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            rc = p.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            kill_all(procs)
            pytest.fail(f"still running after {timeout:.0f} s:\n{tails(logs)}")
        if rc != 0:
            kill_all(procs)
            pytest.fail(f"a launcher exited with status {rc}:\n{tails(logs)}")


def fabric(*options: str) -> list[str]:
    """`fabric run` of the vidistill console script with these options of fabric run's own."""
    return [
        sys.executable,
        str(SCRIPTS / "fabric"),
        "run",
        "--accelerator",
        "cpu",
        *options,
        str(SCRIPTS / "vidistill"),
    ]


def by_rank(root: Path) -> list[dict[int, float]]:
    return [losses_by_step(read_record(str(root / "losses.jsonl"), rank)) for rank in (0, 1)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return video_shards(tmp_path_factory.mktemp("data") / "video", samples=12)


def test_two_nodes_killed_and_resumed_equal_one_node(shards, tmp_path):
    # the reference: one node, two processes, through `fabric run` (which starts them with torchrun)
    one = recipe("control", tmp_path / "one", shards, steps=STEPS, every=EVERY, devices=2, trainer=STRATEGY)
    log = tmp_path / "one.log"
    finish([start([*fabric("--devices", "2"), "fit", "--config", str(one)], log, environment())], [log])
    text = log.read_text()
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in text and f"max_steps={STEPS}` reached" in text
    assert (tmp_path / "one" / "export" / "model.safetensors").is_file()
    reference = by_rank(tmp_path / "one")
    assert [sorted(r) for r in reference] == [list(range(1, STEPS + 1))] * 2

    # two nodes of one process each through recipes/launch/torchrun.sh; node 1 dies after step 3
    two = recipe("control", tmp_path / "two", shards, steps=STEPS, every=EVERY, trainer=STRATEGY)
    port = str(free_port())
    nodes, logs = [], [tmp_path / f"node{r}.log" for r in (0, 1)]
    for r in (0, 1):
        env = environment(NNODES="2", NODE_RANK=str(r), NPROC="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        if r == 1:
            env["VIDISTILL_KILL_AT_STEP"] = str(KILL)
        nodes.append(start(["bash", "recipes/launch/torchrun.sh", str(two)], logs[r], env))
    try:
        assert nodes[1].wait(PATIENCE_S) != 0, tails(logs)
    except subprocess.TimeoutExpired:
        kill_all(nodes)
        pytest.fail(f"node 1 was not killed within {PATIENCE_S} s:\n{tails(logs)}")
    assert f"FAULT: SIGKILL before step {KILL + 1}" in logs[1].read_text()
    try:  # node 0's next collective fails on the closed connection; if it waits on, it is killed
        nodes[0].wait(60)
    except subprocess.TimeoutExpired:
        pass
    kill_all(nodes)  # its worker too, should it still be there: nothing of this run may outlive it
    killed = by_rank(tmp_path / "two")
    assert [sorted(r) for r in killed] == [list(range(1, KILL + 1))] * 2

    # both nodes again, through `fabric run --num-nodes 2`, from the last complete checkpoint
    port = str(free_port())
    procs, logs = [], [tmp_path / f"resume{r}.log" for r in (0, 1)]
    for r in (0, 1):
        node = ["--num-nodes", "2", "--node-rank", str(r), "--main-address", "127.0.0.1", "--main-port", port]
        cmd = fabric("--devices", "1", *node)
        cmd += ["fit", "--config", str(two), "--trainer.num_nodes", "2", "--ckpt_path", "last"]
        procs.append(start(cmd, logs[r], environment()))
    finish(procs, logs)
    for rank in (0, 1):
        rows = read_record(str(tmp_path / "two" / "losses.jsonl"), rank)
        assert [r["step"] for r in rows] == [1, 2, 3, 3, 4, 5, 6]  # resumed from step 2's checkpoint
        assert [r["loss"] for r in rows[:KILL]] == [reference[rank][s] for s in (1, 2, 3)]
        assert losses_by_step(rows) == reference[rank]  # bitwise, every step
    assert (tmp_path / "two" / "export" / "model.safetensors").read_bytes() == (
        tmp_path / "one" / "export" / "model.safetensors"
    ).read_bytes()


def stub(folder: Path, name: str) -> None:
    """An executable that appends its argv (one argument a line, then a blank line) and
    NCCL_NVLS_ENABLE to folder/<name>.calls."""
    path = folder / name
    path.write_text(
        "#!/bin/bash\n"
        f'{{ printf "%s\\n" "$@"; echo "NCCL_NVLS_ENABLE=$NCCL_NVLS_ENABLE"; echo; }} >> "{folder}/{name}.calls"\n'
    )
    path.chmod(0o755)


def test_slurm_sbatch_runs_srun_with_the_recipe_nodes_and_tasks(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("srun", "scontrol"):
        stub(bin_dir, name)
    script = ROOT / "recipes" / "launch" / "slurm.sbatch"
    slurm = {"SLURM_JOB_ID": "77", "SLURM_JOB_NUM_NODES": "4", "SLURM_NTASKS_PER_NODE": "8", "SLURM_NODEID": "0"}
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", **slurm)
    env.pop("NCCL_NVLS_ENABLE", None)
    recipe_path = "recipes/transfer2.5-2b/edge/control.yaml"
    proc = subprocess.run(
        ["bash", str(script), "--trainer.max_steps", "5"],
        cwd=ROOT,
        env=dict(env, RECIPE=recipe_path),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    calls = (bin_dir / "srun.calls").read_text().split("\n\n")[0].split("\n")
    assert calls == [
        "vidistill",
        "fit",
        "--config",
        recipe_path,
        "--trainer.num_nodes",
        "4",
        "--trainer.devices",
        "8",
        "--ckpt_path",
        "last",
        "--trainer.max_steps",
        "5",
        "NCCL_NVLS_ENABLE=0",  # NVLink multicast off unless the job sets it
    ]
    assert not (bin_dir / "scontrol.calls").exists()  # requeue is the Preemption callback's, on SIGUSR1
    text = script.read_text()
    assert "#SBATCH --signal=SIGUSR1@120" in text and "#SBATCH --requeue" in text
    assert "trainers.callbacks.Preemption" in text and "Lightning saves" not in text
    missing = subprocess.run(["bash", str(script)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert missing.returncode != 0 and "set RECIPE" in missing.stderr
    assert not (bin_dir / "srun.calls").read_text().count("\n\n") > 1  # nothing launched without a recipe
