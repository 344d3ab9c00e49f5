"""`vidistill evaluate` against ground truth: PSNR and shape IoU per clip from `--reference`, means
with standard deviations over clips, and where each model came from."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from datamodules.codec import encode_video
from datamodules.metrics import psnr, shape_iou
from datamodules.synthetic import shapes_bytes
from modules.spec import parse_spec
from tools.cli import main

H, W = 32, 48


def square(x0: int, frames: int = 2) -> tuple[np.ndarray, np.ndarray]:
    video = np.full((frames, H, W, 3), 25, np.uint8)
    video[:, 10:22, x0 : x0 + 12] = (230, 30, 30)
    return video, video.max(-1) > 40


def fake_run(root: Path, name: str, video: np.ndarray, clip: Path) -> None:
    """An infer output folder of one spec, as infer writes it (lossless video + record)."""
    fields = {"name": name, "prompt": "a red square", "video_path": str(clip), "resolution": f"{H}x{W}", "edge": {}}
    spec = parse_spec(fields, root, source="test")
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{name}.mkv").write_bytes(encode_video(video, 8.0, "ffv1"))
    record = {"spec": spec.to_json(), "nfe": 4, "seconds": {"generate": 1.0}, "height": H, "width": W}
    (root / f"{name}.json").write_text(json.dumps(record))


def test_reference_scores_psnr_and_shape_iou_with_spread(tmp_path, capsys):
    ref = tmp_path / "ref"
    ref.mkdir()
    truth = {}
    for i, x0 in enumerate((6, 20)):
        video, shapes = square(x0)
        truth[f"c{i}"] = video, shapes
        (ref / f"c{i}.mp4").write_bytes(encode_video(video, 8.0, "ffv1"))
        (ref / f"c{i}.shapes.npy").write_bytes(shapes_bytes(shapes))
    # model A draws each clip exactly; model B draws every square 6 px to the right
    for name, shift in (("a", 0), ("b", 6)):
        for i in range(len(truth)):
            drawn, _ = square((6, 20)[i] + shift)
            fake_run(tmp_path / name, f"c{i}", drawn, ref / f"c{i}.mp4")
    main(
        [
            "evaluate",
            str(tmp_path / "a"),
            str(tmp_path / "b"),
            "--reference",
            str(ref),
            "--labels",
            '["exact", "shifted"]',
            "--sources",
            '["shipped", "trained here: 5 steps"]',
            "--out",
            str(tmp_path / "eval"),
        ]
    )
    runs = json.loads((tmp_path / "eval/metrics.json").read_text())["runs"]
    exact, shifted = runs
    assert exact["shape_iou"] == 1.0 and exact["shape_iou_std"] == 0.0 and exact["psnr"] == 100.0
    expected = [shape_iou(square(x + 6)[0], square(x)[1]) for x in (6, 20)]
    assert shifted["shape_iou"] == pytest.approx(np.mean(expected)) == pytest.approx(6 / 18)
    assert shifted["psnr"] == pytest.approx(psnr(square(12)[0], square(6)[0]))
    assert shifted["source"] == "trained here: 5 steps" and exact["source"] == "shipped"
    assert {"edge_f1", "edge_f1_std", "psnr_std"} <= set(shifted)
    table = (tmp_path / "eval/metrics.md").read_text()
    assert "shape IoU" in table and "0.333 ± 0.000" in table


def test_reference_must_exist(tmp_path):
    video, _ = square(6)
    (tmp_path / "clip.mp4").write_bytes(encode_video(video, 8.0, "ffv1"))
    fake_run(tmp_path / "a", "c0", video, tmp_path / "clip.mp4")
    with pytest.raises(SystemExit, match="--reference .*no such folder"):
        main(["evaluate", str(tmp_path / "a"), "--reference", str(tmp_path / "missing"), "--out", str(tmp_path / "e")])
    assert not (tmp_path / "e").exists()
