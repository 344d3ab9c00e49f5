"""A quickstart training stage killed mid-way (its `vidistill fit` child, SIGKILL after the first
periodic checkpoint) resumes from that checkpoint on the rerun and exports the very weights of an
uninterrupted run: the budget's checkpoint interval gives every stage at least two saves."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from tools.quickstart import stages

STEPS = 4  # checkpoints at steps 2 and 4; the kill comes before step 3


@pytest.fixture
def quickstart_dir(tmp_path, monkeypatch):
    """The smoke budget's data and the shipped teacher, then a directory per run made from them;
    each run's config records its losses (tests/helpers/faults.py) for the test to read and
    skips validation (its sample videos cost more than the steps)."""
    budget = replace(stages.SMOKE, blur_steps=STEPS)
    (tmp_path / "template").mkdir()
    monkeypatch.chdir(tmp_path / "template")
    stages.make_data(budget, 0, False)
    stages.install_shipped()
    config = stages.training_config

    def recorded(*args, **kwargs) -> Path:
        path = config(*args, **kwargs)
        recipe = yaml.safe_load(path.read_text())
        faults = {"class_path": "tests.helpers.faults.Faults", "init_args": {"record": str(Path("losses.jsonl"))}}
        recipe["trainer"]["callbacks"].append(faults)
        recipe["trainer"]["limit_val_batches"] = 0  # no validation (sample videos): resume is what is tested
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        return path

    monkeypatch.setattr(stages, "training_config", recorded)

    def make(name: str) -> Path:
        shutil.copytree(tmp_path / "template", tmp_path / name)
        monkeypatch.chdir(tmp_path / name)
        return tmp_path / name

    return budget, make


def records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "losses.jsonl.rank0").read_text().splitlines()]


def test_a_stage_killed_mid_way_resumes_to_the_same_weights(quickstart_dir, monkeypatch):
    budget, make = quickstart_dir
    clean = make("clean")
    stages.fit("blur", STEPS, "cpu", budget.val_samples)
    killed = make("killed")
    monkeypatch.setenv("VIDISTILL_KILL_AT_STEP", "2")  # SIGKILL as step 3 starts: after the save at step 2
    with pytest.raises(stages.StageFailed):
        stages.fit("blur", STEPS, "cpu", budget.val_samples)
    monkeypatch.delenv("VIDISTILL_KILL_AT_STEP")
    stages.fit("blur", STEPS, "cpu", budget.val_samples)  # the rerun
    steps = [r["step"] for r in records(killed)]
    assert steps == [1, 2, 3, 4], steps  # killed before step 3, resumed from step 2 (not from 0)
    assert [r["loss"] for r in records(killed)] == [r["loss"] for r in records(clean)]
    a, b = (load_file(d / stages.RUNS / "blur/export/model.safetensors") for d in (clean, killed))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
