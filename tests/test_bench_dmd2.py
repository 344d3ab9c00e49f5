"""`vidistill bench --mode dmd2` on CPU: the tiny preset, one tiny grid, float32."""

import math

import pytest

from tools.bench import bench

pytestmark = pytest.mark.usefixtures("one_thread")


def test_dmd2_turns_against_the_control_step(capsys):
    rows = bench(
        mode="dmd2",
        preset="tiny",
        shapes="2x4x4",
        steps=1,
        device="cpu",
        dtype="float32",
        checkpointing="attention",
        variants="checkpointing=full",
    )
    assert [(r["configuration"], r["entry"]) for r in rows] == [
        (conf, entry)
        for conf in ("ckpt=attention attn=auto compile=0", "ckpt=full attn=auto compile=0")
        for entry in ("control step", "student turn", "critic turn")
    ]
    for r in rows:
        assert r["error"] is None and r["shape"] == "2x4x4"
        assert r["seconds"] > 0 and math.isfinite(r["seconds"]), r
        assert r["ratio"] > 0 and math.isfinite(r["ratio"]), r
    assert {r["exit_step"] for r in rows if r["entry"] != "control step"} == {3}  # the full simulation of 4 steps
    out = capsys.readouterr().out
    assert "| 2x4x4 | ckpt=full attn=auto compile=0 | critic turn |" in out
    assert "the control step (target <= 3.5x:" in out


def test_dmd2_rejects_a_bad_option_before_measuring():
    with pytest.raises(ValueError, match="student_trainable"):
        bench(mode="dmd2", preset="tiny", shapes="2x4x4", device="cpu", dtype="float32", student_trainable="base")
    with pytest.raises(ValueError, match="checkpointing mode"):
        bench(mode="dmd2", preset="tiny", shapes="2x4x4", device="cpu", dtype="float32", variants="checkpointing=some")
