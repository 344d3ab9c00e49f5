"""Kill -9 and resume: each stage (control, KD, DMD2) is killed at a seeded step, and a control
run inside a checkpoint save; `--ckpt_path last` must then resume from the last complete
checkpoint and repeat the uninterrupted run's losses and final weights exactly (CPU, fp32,
deterministic algorithms). Runs are real `vidistill fit` processes (forked by tests/helpers/zygote.py).

VIDISTILL_FAULT_SEED picks other kill steps (the tests print theirs)."""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest

from modules.checkpoint import COMPLETE, PARTIAL, checkpoint_step, latest_checkpoint
from tests.helpers.faults import read_record
from tests.helpers.reliability import kd_shards, recipe, teacher, video_shards
from tests.helpers.zygote import Zygote

SEED = int(os.environ.get("VIDISTILL_FAULT_SEED", "0"))
STEPS, EVERY = 6, 2


@pytest.fixture(scope="module")
def zygote():
    with Zygote() as z:
        yield z


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    return {"video": video_shards(d / "video"), "kd": kd_shards(d / "kd"), "teacher": teacher(d / "teacher")}


def config(stage: str, root: Path, inputs: dict, **kw) -> Path:
    data = inputs["kd"] if stage == "kd" else inputs["video"]
    return recipe(stage, root, data, inputs["teacher"], steps=STEPS, every=EVERY, **kw)


def fit(zygote, cfg: Path, *args, env=None, expect: int = 0) -> str:
    rc, out = zygote.run(["fit", "--config", cfg, *args], cfg.parent / f"log{time.monotonic_ns()}", env)
    assert rc == expect, f"exit {rc}, expected {expect}:\n{out}"
    return out


def losses(rows: list[dict]) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in rows]


def weights(root: Path) -> bytes:
    return (root / "export" / "model.safetensors").read_bytes()


_clean: dict[str, tuple[list, bytes]] = {}


def clean_run(zygote, stage: str, tmp_path_factory, inputs) -> tuple[list, bytes]:
    """The uninterrupted run of a stage (once per module)."""
    if stage not in _clean:
        root = tmp_path_factory.mktemp(f"clean-{stage}")
        fit(zygote, config(stage, root, inputs))
        rows = read_record(str(root / "losses.jsonl"))
        assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
        _clean[stage] = (losses(rows), weights(root))
    return _clean[stage]


def resume_and_compare(zygote, cfg: Path, stage, tmp_path_factory, inputs, killed_at: int) -> int:
    """Resume with `--ckpt_path last`; the run's losses (killed + resumed) and final weights
    must equal the clean run's exactly. Returns the step it resumed from."""
    root = cfg.parent
    rows = read_record(str(root / "losses.jsonl"))
    ref, ref_weights = clean_run(zygote, stage, tmp_path_factory, inputs)
    assert losses(rows) == ref[:killed_at], "the run before the kill differs from the clean run"
    start = checkpoint_step(latest_checkpoint(root / "ckpt"))
    assert killed_at - EVERY <= start <= killed_at  # at most the steps since the last checkpoint are lost
    fit(zygote, cfg, "--ckpt_path", "last")
    resumed = read_record(str(root / "losses.jsonl"))[len(rows) :]
    assert losses(resumed) == ref[start:], f"resumed from step {start}: losses differ"
    assert weights(root) == ref_weights, "final weights differ from the uninterrupted run's"
    return start


@pytest.mark.parametrize("stage", ["control", "kd", "dmd2"])
def test_kill9_at_a_seeded_step_resumes_exactly(zygote, inputs, tmp_path, tmp_path_factory, stage):
    kill = random.Random(f"{SEED}:{stage}").randint(3, STEPS - 1)
    print(f"{stage}: SIGKILL after step {kill} (VIDISTILL_FAULT_SEED={SEED})")
    cfg = config(stage, tmp_path, inputs)
    fit(zygote, cfg, env={"VIDISTILL_KILL_AT_STEP": kill}, expect=-signal.SIGKILL)
    start = resume_and_compare(zygote, cfg, stage, tmp_path_factory, inputs, kill)
    print(f"{stage}: resumed from step {start}, losses and weights equal the uninterrupted run")


@pytest.mark.parametrize("nth, which", [(1, "periodic"), (2, "last")])
def test_kill9_inside_a_checkpoint_save_never_resumes_from_it(zygote, inputs, tmp_path, tmp_path_factory, nth, which):
    # step 4 writes epoch=1-step=4.ckpt, then last.ckpt (which already holds step 2's checkpoint)
    cfg = config("control", tmp_path, inputs)
    out = fit(zygote, cfg, env={"VIDISTILL_KILL_IN_SAVE": f"4:{nth}"}, expect=-signal.SIGKILL)
    print(f"kill inside the {which} save at step 4: " + next(line for line in out.splitlines() if "FAULT" in line))
    ckpt = tmp_path / "ckpt"
    partial = list(ckpt.glob("*" + PARTIAL))
    assert len(partial) == 1 and any(partial[0].glob("*.distcp")) and not (partial[0] / ".metadata").exists()
    assert not (partial[0] / COMPLETE).exists()
    expected = 4 if which == "last" else 2  # the periodic step-4 checkpoint was complete before last's save
    assert checkpoint_step(latest_checkpoint(ckpt)) == expected
    assert checkpoint_step(ckpt / "last.ckpt") == 2  # the previous last is intact
    start = resume_and_compare(zygote, cfg, "control", tmp_path_factory, inputs, 4)
    assert start == expected
    assert not list(ckpt.glob("*" + PARTIAL))  # the leftover was cleaned at the start


def test_sigusr1_under_slurm_checkpoints_requeues_exits_and_resumes_exactly(zygote, inputs, tmp_path, tmp_path_factory):
    """A faked SLURM job (environment + a stub `scontrol` on PATH that records its arguments)."""
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/scontrol.calls\n')
    (stub / "scontrol").chmod(0o755)
    slurm = {
        "SLURM_JOB_ID": "4242",
        "SLURM_NTASKS": "1",
        "SLURM_JOB_NAME": "vidistill",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_NODELIST": "localhost",
        "PATH": f"{stub}:{os.environ['PATH']}",
    }
    cfg = config("control", tmp_path, inputs)
    out = fit(zygote, cfg, env=dict(slurm, VIDISTILL_SIGUSR1_AT_STEP="3"), expect=0)
    # the signal lands before step 4; step 4 finishes, then every rank saves and stops
    assert "pre-empted at step 4" in out and "job requeued" in out, out
    assert (tmp_path / "scontrol.calls").read_text().split() == ["requeue", "4242"]
    latest = latest_checkpoint(tmp_path / "ckpt")
    assert latest.name == "preempted-step=4.ckpt" and checkpoint_step(latest) == 4
    assert not (tmp_path / "export").exists()  # a pre-empted run exports nothing
    assert not list(tmp_path.glob("hpc_ckpt_*"))  # Lightning's own handler did not run
    start = resume_and_compare(zygote, cfg, "control", tmp_path_factory, inputs, 4)
    assert start == 4  # nothing lost
