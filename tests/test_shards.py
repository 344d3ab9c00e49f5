"""make-shards, encode-text and the synthetic dataset on tiny clips (a few frames of 32x48)."""

from __future__ import annotations

import hashlib
import json
import pickle
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load as st_load

from datamodules.codec import decode_video, encode_video
from datamodules.shards import expand_shards, iter_tar_samples
from datamodules.synthetic import SHAPE_COLOURS, SHAPES, synthetic_clip, write_latent_shards, write_synthetic_shards
from datamodules.writer import SkipSample, read_index, write_shards
from tools.cli import main
from tools.encode_text import encode_text
from tools.make_shards import make_shards

T, H, W = 6, 32, 48


def tiny_video(seed: int, t: int = T) -> bytes:
    frames, _ = synthetic_clip(random.Random(seed), t, H, W)
    return encode_video(frames, 24.0)


def samples(out) -> list[dict]:
    return [s for url in expand_shards(str(out)) for s in iter_tar_samples(url)]


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def video_folder(tmp_path):
    """5 videos; "c" has no caption; "a" and "b" have edge videos, "a" keypoints, "b" a mask."""
    src = tmp_path / "src"
    (src / "edge").mkdir(parents=True)
    (src / "mask").mkdir()
    (src / "keypoint").mkdir()
    for i, stem in enumerate("abcde"):
        (src / f"{stem}.mp4").write_bytes(tiny_video(i))
        if stem != "c":
            (src / f"{stem}.txt").write_text(f"caption of {stem}\n")
    for stem in "ab":
        (src / "edge" / f"{stem}.mp4").write_bytes(tiny_video(100 + ord(stem)))
    (src / "keypoint" / "a.json").write_text("[[[1, 2, 0.9]]]")
    (src / "mask" / "b.mp4").write_bytes(tiny_video(7))
    return src


def test_folder_round_trip_skip_and_resume(video_folder, tmp_path):
    src, out = video_folder, tmp_path / "shards"
    with pytest.warns(UserWarning, match="no .txt caption"):
        make_shards(str(src), str(out), samples_per_shard=2, progress=False)
    got = {s["__key__"]: s for s in samples(out)}
    assert sorted(got) == ["a", "b", "d", "e"]
    for key, s in got.items():
        assert s["mp4"] == (src / f"{key}.mp4").read_bytes()  # stored as they are
        assert s["txt"].decode() == f"caption of {key}"
        meta = json.loads(s["json"])
        assert meta["caption"] == f"caption of {key}" and meta["fps"] == pytest.approx(24.0)
        assert (meta["frames"], meta["width"], meta["height"]) == (T, W, H)
    for key in "ab":
        assert got[key]["edge.mp4"] == (src / "edge" / f"{key}.mp4").read_bytes()
    assert "edge.mp4" not in got["d"]
    assert got["a"]["keypoint.json"] == (src / "keypoint" / "a.json").read_bytes()
    assert got["b"]["mask.mp4"] == (src / "mask" / "b.mp4").read_bytes()

    index = read_index(out)
    assert [(e["name"], e["samples"]) for e in index["shards"]] == [("train-000000.tar", 2), ("train-000001.tar", 2)]
    assert index["total"] == 4 and index["skipped"] == {"no caption": 1} and index["complete"]

    first, last = out / "train-000000.tar", out / "train-000001.tar"
    before = (first.stat().st_mtime_ns, digest(first), digest(last))
    last.unlink()
    (out / "train-000002.tar.tmp").write_bytes(b"half a shard from a crash")
    with pytest.warns(UserWarning):
        make_shards(str(src), str(out), samples_per_shard=2, progress=False)
    assert first.stat().st_mtime_ns == before[0] and digest(first) == before[1]  # untouched
    assert digest(last) == before[2]  # rewritten, identical
    assert not list(out.glob("*.tmp"))
    assert read_index(out)["total"] == 4 and read_index(out)["skipped"] == {"no caption": 1}


def test_crash_leaves_no_half_shard(tmp_path):
    def build(key):
        if key == "k3":
            raise RuntimeError("crash")
        if key == "k1":
            raise SkipSample("broken")
        return [("txt", key.encode())]

    with pytest.raises(RuntimeError):
        write_shards(tmp_path, [f"k{i}" for i in range(6)], build, samples_per_shard=2, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.json", "train-000000.tar"]
    index = read_index(tmp_path)
    assert index["total"] == 1 and not index["complete"] and index["skipped"] == {"broken": 1}


def test_encode_text_adds_embeddings_and_latents(tmp_path):
    from modules.text import TextEncoder
    from modules.tokenizer import build_tokenizer

    src, out = tmp_path / "syn", tmp_path / "enc"
    write_synthetic_shards(
        str(src), num_samples=3, samples_per_shard=2, num_frames=4, height=H, width=W, progress=False
    )
    encode_text(str(src), str(out), tokenizer="pixel", num_frames=4, batch_size=2, progress=False)
    assert sorted(p.name for p in out.glob("*.tar")) == sorted(p.name for p in src.glob("*.tar"))
    reference = TextEncoder.tiny()
    before, after = samples(src), samples(out)
    assert [s["__key__"] for s in after] == [s["__key__"] for s in before]
    for old, new in zip(before, after):
        kept = {k: v for k, v in new.items() if not k.endswith("safetensors") and k != "__url__"}
        assert kept == {k: v for k, v in old.items() if k != "__url__"}  # originals unchanged
        emb, mask = reference.encode(old["txt"].decode())
        text = st_load(new["text.safetensors"])
        torch.testing.assert_close(text["emb"], emb[0], rtol=0, atol=0)
        assert torch.equal(text["mask"], mask[0].to(torch.uint8))
        lat = st_load(new["latent.safetensors"])
        assert lat["latent"].shape == lat["control.edge"].shape == (48, 4, H // 4, W // 4)
        # pixel tokenizer is lossless: its latents are the decoded clip itself
        frames = torch.from_numpy(decode_video(old["mp4"])[0]).permute(3, 0, 1, 2).float() / 127.5 - 1
        torch.testing.assert_close(build_tokenizer("pixel").decode(lat["latent"][None])[0], frames)
    assert read_index(out)["total"] == 3
    mtimes = [p.stat().st_mtime_ns for p in sorted(out.glob("*.tar"))]
    encode_text(str(src), str(out), tokenizer="pixel", num_frames=4, batch_size=2, progress=False)
    assert [p.stat().st_mtime_ns for p in sorted(out.glob("*.tar"))] == mtimes  # resumed: nothing redone


def test_synthetic_clip_matches_caption():
    for seed in range(12):
        frames, caption = synthetic_clip(random.Random(seed), 9, 48, 64)
        assert frames.shape == (9, 48, 64, 3) and frames.dtype == np.uint8
        assert not np.array_equal(frames[0], frames[-1])  # things move
        named = [c for c in SHAPE_COLOURS if f" {c} " in caption]
        kinds = [k for k in SHAPES if k in caption]
        assert 1 <= len(named) <= 3 and kinds and " floor" in caption
        pixels = frames.reshape(-1, 3).astype(int)
        for c in named:  # every colour the caption names is on screen
            assert (np.abs(pixels - SHAPE_COLOURS[c]).max(axis=1) < 8).sum() > 10, (seed, c, caption)


def test_plain_floors_leave_only_shape_outlines():
    from datamodules.controls import edge
    from datamodules.synthetic import FLOOR_COLOURS

    for seed in range(6):
        frames, caption = synthetic_clip(random.Random(seed), 4, 48, 64, floors=("plain",))
        floor = [n for n in FLOOR_COLOURS if f" {n} floor" in caption]
        assert len(floor) == 1 and not any(p in caption for p in ("striped", "checkered", "dotted", "gradient"))
        # every pixel is the floor colour or part of a shape (its colour, or antialiased outline)
        is_floor = (frames.astype(int) == FLOOR_COLOURS[floor[0]]).all(-1)
        edges = edge(frames, "medium")[..., 0] > 0
        assert is_floor.mean() > 0.4 and not (edges & is_floor & _interior(is_floor)).any()
    with pytest.raises(ValueError, match="floors"):
        synthetic_clip(random.Random(0), 4, 48, 64, floors=("wavy",))


def test_floor_colours_restrict_the_floor_and_keep_the_default_draws():
    from datamodules.synthetic import FLOOR_COLOURS

    for seed in range(4):
        frames, caption = synthetic_clip(random.Random(seed), 4, 32, 48, floors=("plain",), floor_colours=("gray",))
        assert " gray floor" in caption and (frames[:, 0, 0] == FLOOR_COLOURS["gray"]).all()
        # all colours listed explicitly draws exactly what the default draws
        every = synthetic_clip(random.Random(seed), 4, 32, 48, floor_colours=tuple(FLOOR_COLOURS))
        default = synthetic_clip(random.Random(seed), 4, 32, 48)
        assert every[1] == default[1] and np.array_equal(every[0], default[0])
    with pytest.raises(ValueError, match="floor colours"):
        synthetic_clip(random.Random(0), 4, 32, 48, floor_colours=("purple",))


def _interior(mask: np.ndarray) -> np.ndarray:
    """Pixels whose whole 5x5 neighbourhood is in `mask` (per frame): no edge can be there."""
    import cv2

    k = np.ones((5, 5), np.uint8)
    return np.stack([cv2.erode(m.astype(np.uint8), k) for m in mask]).astype(bool)


def test_synthetic_shards_deterministic_with_edges(tmp_path):
    kw = dict(num_samples=3, samples_per_shard=2, num_frames=T, height=H, width=W, progress=False)
    a = write_synthetic_shards(str(tmp_path / "a"), seed=3, **kw)
    b = write_synthetic_shards(str(tmp_path / "b"), seed=3, **kw)
    c = write_synthetic_shards(str(tmp_path / "c"), seed=4, **kw)
    assert len(a) == 2 and [open(p, "rb").read() for p in a] == [open(p, "rb").read() for p in b]
    assert open(a[0], "rb").read() != open(c[0], "rb").read()
    for s in samples(tmp_path / "a"):
        caption = s["txt"].decode()
        assert any(f" {c} " in caption for c in SHAPE_COLOURS) and any(k in caption for k in SHAPES)
        assert json.loads(s["json"])["caption"] == caption
        video, _ = decode_video(s["mp4"])
        edge, _ = decode_video(s["edge.mp4"])
        assert edge.shape == video.shape == (T, H, W, 3)
        assert 0 < (edge > 127).mean() < 0.5  # real edges, not a blank or full frame


def test_latent_shards_shapes(tmp_path):
    write_latent_shards(
        str(tmp_path),
        num_samples=3,
        latent_shape=(4, 2, 6, 8),
        text_shape=(10, 12),
        samples_per_shard=2,
        control_modalities=("edge", "depth"),
        progress=False,
    )
    got = samples(tmp_path)
    assert len(got) == 3 and read_index(tmp_path)["total"] == 3
    for s in got:
        lat, text = st_load(s["latent.safetensors"]), st_load(s["text.safetensors"])
        assert set(lat) == {"latent", "control.edge", "control.depth"}
        assert all(v.shape == (4, 2, 6, 8) and v.dtype == torch.bfloat16 for v in lat.values())
        assert text["emb"].shape == (10, 12) and text["mask"].tolist() == [1] * 10
        assert "mp4" not in s and json.loads(s["json"])["fps"] == 24.0
    assert not torch.equal(
        st_load(got[0]["latent.safetensors"])["latent"], st_load(got[1]["latent.safetensors"])["latent"]
    )
    for bad in ("int32", "float8", "randn"):
        with pytest.raises(ValueError, match="dtype"):
            write_latent_shards(str(tmp_path / "bad"), num_samples=1, dtype=bad, progress=False)


def test_transfer1_kd_conversion(tmp_path):
    src, out = tmp_path / "kd", tmp_path / "out"
    for d in ("videos", "t5_xxl", "noise", "edge"):
        (src / d).mkdir(parents=True)
    rng = np.random.default_rng(0)
    expect = {}
    for i, stem in enumerate(["ex1", "ex2", "ex3"]):
        (src / "videos" / f"{stem}.mp4").write_bytes(tiny_video(i))
        (src / "edge" / f"{stem}.mp4").write_bytes(tiny_video(50 + i))
        emb = rng.standard_normal((5 + i, 16)).astype(np.float16)
        noise = rng.standard_normal((4, 2, 4, 6)).astype(np.float32)
        # Transfer1's get_t5_embeddings.py pickles [array]; a dict is accepted too
        (src / "t5_xxl" / f"{stem}.pickle").write_bytes(pickle.dumps([emb] if i == 0 else {"t5_xxl": emb}))
        if stem != "ex3":  # ex3 has no noise: skipped
            (src / "noise" / f"{stem}.pickle").write_bytes(pickle.dumps(noise))
        expect[stem] = (emb, noise)
    (src / "videos" / "ex1.txt").write_text("a teacher video")
    with pytest.warns(UserWarning, match="skipped"):
        make_shards(str(src), str(out), transfer1_kd=True, progress=False)
    got = {s["__key__"]: s for s in samples(out)}
    assert sorted(got) == ["ex1", "ex2"]
    for stem, s in got.items():
        emb, noise = expect[stem]
        kd, text = st_load(s["kd.safetensors"]), st_load(s["text.safetensors"])
        assert set(kd) == {"noise"} and torch.equal(kd["noise"], torch.from_numpy(noise))
        n = len(emb)
        assert text["emb"].shape == (512, 16) and torch.equal(text["emb"][:n], torch.from_numpy(emb))
        assert not text["emb"][n:].any() and text["mask"].sum() == n
        meta = json.loads(s["json"])
        assert meta["teacher_states"] is False and meta["kd"] == "transfer1"
        assert s["edge.mp4"] == (src / "edge" / f"{stem}.mp4").read_bytes()
        assert s["mp4"] == (src / "videos" / f"{stem}.mp4").read_bytes()
    assert got["ex1"]["txt"] == b"a teacher video" and got["ex2"]["txt"] == b""
    index = read_index(out)
    assert index["total"] == 2 and index["skipped"] == {"no t5_xxl or noise pickle": 1}


def transfer1_folder(src, samples: int, frames: int, size: int, latent: tuple[int, ...], text_dim: int) -> None:
    """A Cosmos-Transfer1 KD folder: teacher videos, their edge videos, T5 pickles and noise pickles."""
    from datamodules.controls import compute_control

    rng = np.random.default_rng(0)
    for d in ("videos", "t5_xxl", "noise", "edge"):
        (src / d).mkdir(parents=True)
    for i in range(samples):
        video, caption = synthetic_clip(random.Random(i), frames, size, size, ("plain",))
        (src / "videos" / f"ex{i}.mp4").write_bytes(encode_video(video, 8.0))
        (src / "videos" / f"ex{i}.txt").write_text(caption)
        (src / "edge" / f"ex{i}.mp4").write_bytes(encode_video(compute_control("edge", video), 8.0))
        emb = rng.standard_normal((5 + i % 3, text_dim)).astype(np.float32)
        (src / "t5_xxl" / f"ex{i}.pickle").write_bytes(pickle.dumps([emb]))
        (src / "noise" / f"ex{i}.pickle").write_bytes(pickle.dumps(rng.standard_normal(latent).astype(np.float32)))


def test_transfer1_kd_shards_train_a_one_step_kd_warmup_through_fit(tmp_path):
    """Converted Cosmos-Transfer1 KD data feeds KDWarmup: make-shards --transfer1_kd, then
    `vidistill fit` of a 1-step KD recipe. The shards hold the noise and the teacher's decoded
    video, no x0: the stage encodes the video with the recipe's tokenizer as the target, and the
    first recorded loss is 0.5 MSE(student(noise at t = 1), tokenizer(teacher video))."""
    from datamodules.video import VideoDataModule
    from modules.denoiser import Cond
    from modules.parallel import ShardingConfig
    from modules.sampling import to_unit
    from modules.stages.base import NetSpec, StageOptions, TextSpec, TokenizerSpec
    from modules.stages.kd_warmup import KDWarmup
    from modules.tokenizer import build_tokenizer
    from tests.helpers.faults import read_record
    from tests.helpers.reliability import FRAMES, PIXEL, SIZE, fit, output, recipe, teacher

    latent = (12, FRAMES, SIZE // 2, SIZE // 2)  # the pixel tokenizer (spatial 2) of a 4-frame 16x16 clip
    transfer1_folder(tmp_path / "t1", 6, FRAMES, SIZE, latent, text_dim=32)
    make_shards(str(tmp_path / "t1"), str(tmp_path / "kd"), samples_per_shard=3, transfer1_kd=True, progress=False)
    net = teacher(tmp_path / "teacher")
    cfg = recipe("kd", tmp_path / "run", str(tmp_path / "kd"), net, steps=3, every=3, model={"t_list": [1.0]})
    proc = fit(cfg)
    assert proc.returncode == 0, output(proc)
    rows = read_record(str(tmp_path / "run" / "losses.jsonl"))
    assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in rows)
    assert (tmp_path / "run" / "export" / "model.safetensors").is_file()

    # the first step again, in this process: the datamodule's first batch through the stage
    dm = VideoDataModule(
        str(tmp_path / "kd"), batch_size=2, num_workers=0, num_frames=FRAMES, height=SIZE, width=SIZE,
        modality="edge", use_kd=True, use_text_embeddings=True, batches_per_epoch=3, seed=0,
    )  # fmt: skip
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert "latent" not in batch and batch["video"].shape == (2, 3, FRAMES, SIZE, SIZE)
    options = StageOptions(
        tokenizer=TokenizerSpec(kind="pixel", options=PIXEL["options"]),
        text=TextSpec(encoder="none"),
        sharding=ShardingConfig(param_dtype="float32", checkpointing="none"),
    )
    stage = KDWarmup(NetSpec(init_from=net), t_list=(1.0,), options=options)
    stage.configure_model()
    with torch.no_grad():
        loss = float(stage.loss(batch, step=0))
        tok = build_tokenizer("pixel", **PIXEL["options"])
        cond = Cond(
            text=batch["text_emb"],
            text_mask=batch["text_mask"],
            controls={"edge": tok.encode(to_unit(batch["control"]))},
            fps=float(batch["fps"][0]),
        )
        x0 = stage.model.denoise(batch["kd_noise"], torch.ones(2), cond)
        by_hand = float(0.5 * (x0 - tok.encode(to_unit(batch["video"]))).square().mean())
        assert loss == pytest.approx(by_hand, rel=1e-6) and loss == pytest.approx(rows[0]["loss"], rel=1e-5)
        # noise of another teacher's latent space is named, not broadcast
        with pytest.raises(ValueError, match="KD noise is"):
            stage.loss(dict(batch, kd_noise=batch["kd_noise"][:, :, :2]), step=0)


def test_cli_make_shards(tmp_path, capsys):
    out = tmp_path / "cli"
    main(
        [
            "make-shards",
            "--synthetic",
            "video",
            "--out",
            str(out),
            "--num_samples",
            "3",
            "--num_frames",
            "4",
            "--height",
            "32",
            "--width",
            "32",
            "--samples_per_shard",
            "2",
            "--progress",
            "false",
        ]
    )
    assert "wrote 3 samples in 2 shards" in capsys.readouterr().out
    assert read_index(out)["total"] == 3 and len(samples(out)) == 3
    with pytest.raises(SystemExit) as err:
        main(["make-shards", "--src", str(tmp_path / "nowhere"), "--out", str(out)])
    assert "does not exist" in str(err.value)


def test_shape_scale_grows_every_shape_and_keeps_the_captions():
    """shape_scale multiplies the shapes' size (more pixels off the floor) and draws the same scene."""

    def shape_pixels(scale: float) -> tuple[int, str]:
        frames, caption = synthetic_clip(random.Random(3), 4, 64, 96, ("plain",), ("black",), shape_scale=scale)
        return int((np.abs(frames.astype(int) - frames[0, 0, 0].astype(int)).sum(-1) > 0).sum()), caption

    (small, c1), (big, c2) = shape_pixels(1.0), shape_pixels(1.8)
    assert c1 == c2 and big > 2 * small
    with pytest.raises(ValueError, match="shape_scale"):
        synthetic_clip(random.Random(3), 4, 64, 96, shape_scale=0)
