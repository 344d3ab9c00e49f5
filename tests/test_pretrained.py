"""The shipped quickstart teacher: it loads, its files match their recorded hashes and config, a
damaged file is refused, and on a held-out clip it draws the clip's shapes better than the same
network with its control branch off (its edge branch at weight 0)."""

from __future__ import annotations

import json
import random
import shutil

import pytest

from datamodules.codec import encode_video
from datamodules.synthetic import shapes_bytes, synthetic_clip
from modules.denoiser import Denoiser
from modules.pretrained import RECORD, sha256, shipped, verify
from tools.cli import main

NAME = "quickstart-edge"


def test_the_shipped_teacher_loads_and_matches_its_record():
    path = shipped(NAME)
    record = json.loads((path / RECORD).read_text())
    assert set(record["sha256"]) == {"config.json", "generation.json", "model.safetensors"}
    for file, digest in record["sha256"].items():
        assert sha256(path / file) == digest
    net = Denoiser.from_pretrained(path)
    assert net.cfg.modalities == ["edge"] and net.cfg.prediction == "x0"
    assert json.loads(json.dumps(net.cfg.to_dict())) == json.loads((path / "config.json").read_text())
    for key in ("commands", "seed", "budget", "data", "torch"):
        assert key in record, key


def test_a_damaged_shipped_file_is_refused(tmp_path):
    copy = tmp_path / NAME
    shutil.copytree(shipped(NAME), copy)
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (copy / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="model.safetensors does not match its recorded SHA-256"):
        verify(copy)


def test_the_shipped_teacher_follows_its_edge_control(tmp_path):
    """A clip the teacher never trained on (seed 1 of the val prefix): shape IoU with the edge
    control beats the same network, prompt and seed with the branch's weight 0."""
    frames, caption, shapes = synthetic_clip(
        random.Random("vidistill-synthetic:1:3"), 4, 32, 48, ("plain",), ("black",), 1.8, with_shapes=True
    )
    ref = tmp_path / "videos"
    ref.mkdir()
    (ref / "clip.mp4").write_bytes(encode_video(frames, 24.0))
    (ref / "clip.shapes.npy").write_bytes(shapes_bytes(shapes))
    for run, weight in (("on", 1.0), ("off", 0.0)):
        spec = {"name": "clip", "prompt": caption, "video_path": "videos/clip.mp4", "seed": 7}
        spec |= {"resolution": "32x48", "max_frames": 4, "num_steps": 35, "guidance": 0}
        spec["edge"] = {"control_weight": weight}
        (tmp_path / f"{run}.json").write_text(json.dumps(spec))
        args = ["-i", str(tmp_path / f"{run}.json"), "-o", str(tmp_path / run), "--lossless", "--device", "cpu"]
        main(["infer", *args, "--model", str(shipped(NAME))])
    runs = [str(tmp_path / run) for run in ("on", "off")]
    main(["evaluate", *runs, "--reference", str(ref), "--out", str(tmp_path / "eval")])
    on, off = json.loads((tmp_path / "eval/metrics.json").read_text())["runs"]
    assert on["shape_iou"] > off["shape_iou"] + 0.1, (on["shape_iou"], off["shape_iou"])
    assert on["edge_f1"] > off["edge_f1"], (on["edge_f1"], off["edge_f1"])
