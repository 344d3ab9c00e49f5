"""`vidistill bench --mode dmd2` on CPU: the tiny preset, one tiny grid, float32."""

import json
import math

import pytest
import torch

from modules.nets import dit
from tools.bench import bench

pytestmark = pytest.mark.usefixtures("one_thread")

STAGE_ENTRIES = ("KD step", "student turn", "critic turn")


@pytest.fixture
def aot_eager_blocks(monkeypatch):
    """Compiled blocks use aot_eager instead of inductor (tests/test_bench_options.py says why),
    with Dynamo's caches cleared before, so graph counts do not depend on earlier tests, and
    after, so this test's graphs do not count towards a later test's recompile limit."""
    compiled = dit._compiled_run
    monkeypatch.setattr(dit, "_compiled_run", lambda backend: compiled("aot_eager"))
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def losses_by_configuration(rows: list[dict], entry: str) -> dict[str, list[float]]:
    """{configuration: the losses of its `entry` row's runs}."""
    return {r["configuration"]: r["losses"] for r in rows if r["entry"] == entry}


def tiny_dmd2_bench(**options) -> list[dict]:
    """`bench --mode dmd2` of the tiny preset on one 2x4x4 grid, one timed run, CPU float32."""
    return bench(mode="dmd2", preset="tiny", shapes="2x4x4", steps=1, device="cpu", dtype="float32", **options)


def test_dmd2_turns_against_the_control_step(capsys):
    rows = tiny_dmd2_bench(checkpointing="attention", variants="checkpointing=full")
    assert [(r["configuration"], r["entry"]) for r in rows] == [
        (conf, entry)
        for conf in ("ckpt=attention attn=auto compile=0", "ckpt=full attn=auto compile=0")
        for entry in ("control step", "KD step", "student turn", "critic turn")
    ]
    for r in rows:
        assert r["error"] is None and r["shape"] == "2x4x4"
        assert r["seconds"] > 0 and math.isfinite(r["seconds"]), r
        assert r["ratio"] > 0 and math.isfinite(r["ratio"]), r
    assert {r["exit_step"] for r in rows if r["entry"].endswith("turn")} == {3}  # the full simulation of 4 steps
    for entry in STAGE_ENTRIES:
        # warm-up and timed run of each configuration; checkpointing modes are bit-identical and
        # every configuration starts from the same weights, optimizer state and draws
        by_conf = losses_by_configuration(rows, entry)
        assert len(by_conf) == 2
        first, second = by_conf.values()
        assert len(first) == 2 and all(math.isfinite(x) for x in first), (entry, first)
        assert first == second, entry
    assert all(r["new_graphs"] == 0 for r in rows if r["entry"] in STAGE_ENTRIES)  # eager blocks
    out = capsys.readouterr().out
    assert "| 2x4x4 | ckpt=full attn=auto compile=0 | KD step |" in out
    assert "| 2x4x4 | ckpt=full attn=auto compile=0 | critic turn |" in out
    assert "the control step (DMD2 turns' target <= 3.5x:" in out
    head = next(json.loads(line) for line in out.splitlines() if line.startswith('{"command"'))
    trainable = head["trainable_params"]
    assert trainable["KD step"] == trainable["student"] > trainable["control step"]  # kd.yaml's trainable: all


@pytest.mark.usefixtures("aot_eager_blocks")
def test_dmd2_compiled_kd_step_and_turns(capsys):
    """--compile true beside eager blocks, as docs/benchmarks.md's command runs them: the same
    losses step for step, graphs compiled in the first runs only."""
    rows = tiny_dmd2_bench(checkpointing="full", compile=True, variants="compile=false")
    assert all(r["error"] is None for r in rows)
    kd = {r["configuration"]: r for r in rows if r["entry"] == "KD step"}
    on, off = kd["ckpt=full attn=auto compile=1"], kd["ckpt=full attn=auto compile=0"]
    assert on["new_graphs"] > 0 and off["new_graphs"] == 0
    for entry in STAGE_ENTRIES:
        by_conf = losses_by_configuration(rows, entry)
        torch.testing.assert_close(*by_conf.values(), rtol=1e-5, atol=1e-7)
    out = capsys.readouterr().out
    assert '"entry": "KD steps after warm-up", "new_graphs": 0' in out
    assert '"entry": "alternating turns", "new_graphs": 0' in out


def test_dmd2_rejects_a_bad_option_before_measuring():
    with pytest.raises(ValueError, match="student_trainable"):
        bench(mode="dmd2", preset="tiny", shapes="2x4x4", device="cpu", dtype="float32", student_trainable="base")
    with pytest.raises(ValueError, match="checkpointing mode"):
        bench(mode="dmd2", preset="tiny", shapes="2x4x4", device="cpu", dtype="float32", variants="checkpointing=some")
