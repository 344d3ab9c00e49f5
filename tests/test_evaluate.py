"""`vidistill evaluate` against ground truth: PSNR, shape IoU and colour match per clip from
`--reference`, means with standard deviations over clips, and where each model came from."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from datamodules.codec import encode_video
from datamodules.metrics import colour_match, psnr, shape_iou
from datamodules.synthetic import SHAPE_COLOURS, shapes_bytes, synthetic_clip
from modules.evaluation import summarise
from modules.spec import parse_spec
from tools.cli import main

H, W = 32, 48


def square(x0: int, frames: int = 2, colour: str = "red") -> tuple[np.ndarray, np.ndarray]:
    video = np.full((frames, H, W, 3), 25, np.uint8)
    video[:, 10:22, x0 : x0 + 12] = SHAPE_COLOURS[colour]
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
    # half of each true square is drawn, in its colour; the other half is floor
    assert exact["colour_match"] == 1.0 and shifted["colour_match"] == 0.5 and shifted["colour_match_std"] == 0.0
    table = (tmp_path / "eval/metrics.md").read_text()
    assert "shape IoU" in table and "0.333 ± 0.000" in table


def test_reference_must_exist(tmp_path):
    video, _ = square(6)
    (tmp_path / "clip.mp4").write_bytes(encode_video(video, 8.0, "ffv1"))
    fake_run(tmp_path / "a", "c0", video, tmp_path / "clip.mp4")
    with pytest.raises(SystemExit, match="--reference .*no such folder"):
        main(["evaluate", str(tmp_path / "a"), "--reference", str(tmp_path / "missing"), "--out", str(tmp_path / "e")])
    assert not (tmp_path / "e").exists()


def test_colour_match_counts_bright_pixels_of_the_reference_colour():
    # a red and a blue square on a black floor; the masks are where they are
    reference = np.full((2, H, W, 3), 25, np.uint8)
    reference[:, 4:12, 4:12] = SHAPE_COLOURS["red"]
    reference[:, 16:24, 20:28] = SHAPE_COLOURS["blue"]
    shapes = reference.max(-1) > 40
    assert colour_match(reference, reference, shapes) == 1.0
    # off-palette shades still round to the right entries; the floor outside the masks is not looked at
    shaded = reference.copy()
    shaded[:, 4:12, 4:12] = (190, 60, 50)
    shaded[:, 16:24, 20:28] = (60, 100, 200)
    shaded[~shapes] = 255
    assert colour_match(shaded, reference, shapes) == 1.0
    wrong = np.where(shapes[..., None], np.array(SHAPE_COLOURS["green"], np.uint8), 25).astype(np.uint8)
    assert colour_match(wrong, reference, shapes) == 0.0
    swapped = reference.copy()
    swapped[:, 4:12, 4:12], swapped[:, 16:24, 20:28] = SHAPE_COLOURS["blue"], SHAPE_COLOURS["red"]
    assert colour_match(swapped, reference, shapes) == 0.0
    dark = (reference // 8).astype(np.uint8)  # the right hues, but max RGB 30: not drawn
    assert colour_match(dark, reference, shapes) == 0.0 and colour_match(reference, reference, shapes, 250) == 0.0
    # of 256 shape pixels: the red square right (64), the blue one half right (32), a quarter
    # green (16) and a quarter dark blue (16); frame 2 all right (128)
    mixed = reference.copy()
    mixed[0, 16:24, 24:26] = SHAPE_COLOURS["green"]
    mixed[0, 16:24, 26:28] = (5, 10, 35)
    assert colour_match(mixed, reference, shapes) == (64 + 32 + 128) / 256
    assert colour_match(mixed, reference, shapes.astype(np.uint8)) == (64 + 32 + 128) / 256
    assert math.isnan(colour_match(reference, reference, np.zeros_like(shapes)))  # no shape: no colour


def test_colour_match_rejects_mismatched_sizes():
    video = np.zeros((2, H, W, 3), np.uint8)
    shapes = np.ones((2, H, W), bool)
    with pytest.raises(ValueError, match="reference .* differ in size"):
        colour_match(video, video[:1], shapes)
    with pytest.raises(ValueError, match="shape masks .* differ in size"):
        colour_match(video, video, shapes[:, :, :-1])
    with pytest.raises(ValueError, match="shape masks .* differ in size"):
        colour_match(video, video, shapes[..., None])


def test_synthetic_clips_are_drawn_in_the_colours_their_captions_name():
    """Colour match reads the colour off the reference: a real clip's shape pixels must round to
    the colours its caption names, all of the inside and most of the anti-aliased rim."""
    matches = []
    for seed in range(8):
        frames, caption, shapes = synthetic_clip(
            random.Random(seed), 4, H, W, floors=("plain",), floor_colours=("black",), shape_scale=1.8, with_shapes=True
        )
        assert colour_match(frames, frames, shapes) == 1.0
        named = [c for c in SHAPE_COLOURS if f" {c} " in caption]
        palette = np.array([SHAPE_COLOURS[c] for c in named], np.int32)
        # each shape pixel painted in the named colour nearest the clip's pixel there: flat
        # colours, as a model that follows the caption would draw them
        nearest = ((frames[..., None, :].astype(np.int32) - palette) ** 2).sum(-1).argmin(-1)
        painted = np.where(shapes[..., None], palette[nearest], 0).astype(np.uint8)
        matches.append(colour_match(painted, frames, shapes))
        for other in set(SHAPE_COLOURS) - set(named):
            flat = np.where(shapes[..., None], np.array(SHAPE_COLOURS[other], np.uint8), 0).astype(np.uint8)
            assert colour_match(flat, frames, shapes) < 0.06, (seed, other, caption)
    # measured: 0.942 to 1 (mean 0.971); the rest are rim pixels half mixed with the floor
    assert min(matches) > 0.94 and np.mean(matches) > 0.97, matches


def test_colour_match_in_the_table_and_a_dash_without_shape_masks(tmp_path):
    ref = tmp_path / "ref"
    ref.mkdir()
    for i, x0 in enumerate((6, 20)):
        video, shapes = square(x0)
        (ref / f"c{i}.mp4").write_bytes(encode_video(video, 8.0, "ffv1"))
        (ref / f"c{i}.shapes.npy").write_bytes(shapes_bytes(shapes))
    (ref / "bare.mp4").write_bytes(encode_video(square(6)[0], 8.0, "ffv1"))  # a reference without masks
    for i, (x0, colour) in enumerate(((6, "red"), (20, "blue"))):
        fake_run(tmp_path / "mixed", f"c{i}", square(x0, colour=colour)[0], ref / f"c{i}.mp4")
    fake_run(tmp_path / "bare", "bare", square(6)[0], ref / "bare.mp4")
    out = tmp_path / "eval"
    main(["evaluate", str(tmp_path / "mixed"), str(tmp_path / "bare"), "--reference", str(ref), "--out", str(out)])
    mixed, bare = json.loads((out / "metrics.json").read_text())["runs"]
    assert [r["colour_match"] for r in mixed["rows"]] == [1.0, 0.0]  # right colour, then blue for red
    assert mixed["colour_match"] == 0.5 and mixed["colour_match_std"] == pytest.approx(math.sqrt(0.5))
    assert "colour_match" not in bare and "colour_match" not in bare["rows"][0] and bare["psnr"] == 100.0
    header, _, mixed_row, bare_row = (out / "metrics.md").read_text().splitlines()
    columns = [c.strip() for c in header.split("|")]
    assert columns[columns.index("shape IoU") + 1] == "colour match"
    at = columns.index("colour match")
    assert mixed_row.split("|")[at].strip() == "0.500 ± 0.707" and bare_row.split("|")[at].strip() == "–"
    assert "colour match" in (out / "metrics.svg").read_text()


def test_a_clip_without_shapes_has_no_colour_to_match(tmp_path):
    ref = tmp_path / "ref"
    ref.mkdir()
    for i, x0 in enumerate((6, None)):
        video, shapes = (
            square(x0) if x0 is not None else (np.full((2, H, W, 3), 25, np.uint8), np.zeros((2, H, W), bool))
        )
        (ref / f"c{i}.mp4").write_bytes(encode_video(video, 8.0, "ffv1"))
        (ref / f"c{i}.shapes.npy").write_bytes(shapes_bytes(shapes))
        fake_run(tmp_path / "a", f"c{i}", video, ref / f"c{i}.mp4")
    main(["evaluate", str(tmp_path / "a"), "--reference", str(ref), "--out", str(tmp_path / "eval")])
    (run,) = json.loads((tmp_path / "eval/metrics.json").read_text(), parse_constant=pytest.fail)["runs"]
    assert [r["colour_match"] for r in run["rows"]] == [1.0, None]
    assert run["colour_match"] == 1.0 and run["colour_match_std"] == 0.0  # the mean of the one clip with shapes
    # colour_match's own NaN is left out too, as None is
    rows = [{"colour_match": float("nan")}, {"colour_match": 0.25}, {"colour_match": 0.75}]
    assert summarise("x", tmp_path, rows)["colour_match"] == 0.5
