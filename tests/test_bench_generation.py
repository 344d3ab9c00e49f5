"""`vidistill bench --mode generation` on CPU: the tiny preset, one tiny grid, pixel decoding."""

import math

import pytest

from tools.bench import bench

pytestmark = pytest.mark.usefixtures("one_thread")


def test_generation_rows_and_speed_up(capsys):
    rows = bench(
        mode="generation",
        preset="tiny",
        shapes="2x4x4",
        steps=1,
        device="cpu",
        dtype="float32",
        teacher_steps=3,
        guidance=3.0,
        student_steps=2,
        decode="pixel",
    )
    assert [(r["shape"], r["impl"]) for r in rows] == [("2x4x4", "teacher"), ("2x4x4", "student")]
    by = {r["impl"]: r for r in rows}
    assert by["teacher"]["nfe"] == 3 * 2 and by["student"]["nfe"] == 2  # CFG doubles the teacher's calls
    for r in rows:
        for k in ("denoise_s", "decode_s", "total_s", "s_per_nfe"):
            assert r[k] > 0 and math.isfinite(r[k]), (r["impl"], k, r[k])
        assert r["total_s"] >= r["denoise_s"]
        assert r["video"] == "2x8x8"  # pixel tokenizer: spatial 2, temporal 1
    assert "speed-up student vs teacher: denoise" in capsys.readouterr().out


def test_unknown_decode_is_rejected():
    with pytest.raises(ValueError, match="unknown decode 'vae'.*wan2.1, pixel, none"):
        bench(mode="generation", preset="tiny", shapes="2x4x4", device="cpu", dtype="float32", decode="vae")
