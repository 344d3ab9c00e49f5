"""VideoDataModule over tiny webdataset shards (8-frame clips of 32x24 videos)."""

from __future__ import annotations

import io
import json
import tarfile

import lightning
import numpy as np
import pytest
import torch
import webdataset as wds
from safetensors.torch import save as save_safetensors

from datamodules.codec import decode_video, encode_video, resize_crop
from datamodules.controls import compute_control
from datamodules.shards import PROBE_CACHE_ENV, expand_shards
from datamodules.video import VideoDataModule

T_SRC, H, W, FPS = 10, 24, 32, 10.0


def frames_for(idx: int, t: int = T_SRC) -> np.ndarray:
    """Distinct frames per sample index: a flat tone and a moving bright square."""
    frames = np.empty((t, H, W, 3), np.uint8)
    for i in range(t):
        frames[i] = (idx * 37 + i * 5) % 180 + 20
        x = (idx * 3 + i * 2) % (W - 8)
        frames[i, 6:14, x : x + 8] = 255
    return frames


def write_shards(folder, name, counts, extras=None) -> list[str]:
    """Shards ``{name}-{s:06d}.tar`` with ``counts[s]`` samples each (keys ``{name}{s}_{j}``).

    extras(key, idx, frames) -> dict of members to add or, with value None, to drop.
    """
    paths, idx = [], 0
    for s, n in enumerate(counts):
        path = folder / f"{name}-{s:06d}.tar"
        with wds.TarWriter(str(path)) as tw:
            for j in range(n):
                key = f"{name}{s:02d}_{j:03d}"
                frames = frames_for(idx)
                sample = {"__key__": key, "mp4": encode_video(frames, FPS), "txt": f"caption of {key}"}
                sample.update(extras(key, idx, frames) if extras else {})
                tw.write({k: v for k, v in sample.items() if v is not None})
                idx += 1
        paths.append(str(path))
    return paths


@pytest.fixture(autouse=True)
def probe_cache(tmp_path, monkeypatch):
    """Each test's probes cached in its own folder (not the user's cache)."""
    monkeypatch.setenv(PROBE_CACHE_ENV, str(tmp_path / "probe-cache"))


def make_dm(shards, **kw) -> VideoDataModule:
    args = dict(num_frames=8, height=H, width=W, modality=None, num_workers=0, batch_size=2, seed=0)
    args.update(kw)
    dm = VideoDataModule(shards, **args)
    dm.setup("fit")
    return dm


def stream(dm, epoch=None, limit=None) -> list[dict]:
    """Iterate the train loader as the Trainer would (counting each batch in the datamodule)."""
    if epoch is not None:
        dm.set_epoch(epoch)
    out = []
    for batch in dm.train_dataloader():
        out.append(dm.on_after_batch_transfer(batch, 0))
        if limit is not None and len(out) == limit:
            break
    return out


def keys(batches) -> list[str]:
    return [k for b in batches for k in b["key"]]


# --------------------------------------------------------------------------------------------


def test_video2dataset_layout(tmp_path):
    """Plain tarfile members {key}.mp4/.txt/.json; caption from json when there is no txt."""
    path = tmp_path / "00000.tar"
    members = {
        "000000000.json": json.dumps({"caption": "json caption 0", "fps": FPS, "status": "success"}).encode(),
        "000000000.mp4": encode_video(frames_for(0), FPS),
        "000000000.txt": b"txt caption 0",
        "000000001.mp4": encode_video(frames_for(1), FPS),
        "000000001.json": json.dumps({"caption": "json caption 1", "url": "http://x"}).encode(),
    }
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

    dm = make_dm(str(tmp_path), val_shards=str(tmp_path), height=16, width=16, stride=1, val_samples=8)
    (batch,) = list(dm.val_dataloader())
    assert batch["key"] == ["000000000", "000000001"]
    assert batch["caption"] == ["txt caption 0", "json caption 1"]
    assert batch["video"].shape == (2, 3, 8, 16, 16) and batch["video"].dtype == torch.uint8
    assert torch.allclose(batch["fps"], torch.tensor([FPS, FPS]))
    expected = resize_crop(decode_video(members["000000001.mp4"], list(range(8)))[0], 16, 16)
    assert torch.equal(batch["video"][1], torch.from_numpy(expected).permute(3, 0, 1, 2))

    # training reads the same layout; stride 2 halves the clip's fps
    dm = make_dm(str(tmp_path), num_frames=4, stride=2, batch_size=2)
    (batch,) = stream(dm)
    assert sorted(batch["key"]) == ["000000000", "000000001"]
    assert torch.allclose(batch["fps"], torch.tensor([FPS / 2, FPS / 2]))


def test_shard_listing(tmp_path):
    paths = write_shards(tmp_path, "d", [1, 1, 1])
    assert expand_shards(str(tmp_path / "d-{000000..000002}.tar")) == paths
    assert expand_shards(str(tmp_path)) == paths
    assert expand_shards([paths[2], str(tmp_path / "d-00000[01].tar")]) == [paths[2], *paths[:2]]
    with pytest.raises(FileNotFoundError):
        expand_shards(str(tmp_path / "d-{000000..000003}.tar"))


def test_ranks_and_workers_every_key_once_with_equal_batch_counts(tmp_path):
    # 5 shards with uneven sample counts, 2 ranks x 2 worker processes: 20 samples, 5 batches of 2 each
    counts = [3, 5, 2, 4, 6]
    shards = write_shards(tmp_path, "u", counts)
    all_keys = sorted(f"u{s:02d}_{j:03d}" for s, n in enumerate(counts) for j in range(n))
    per_rank = []
    for rank in (0, 1):
        dm = make_dm(shards, rank=rank, world_size=2, num_workers=2, batch_size=2)
        assert dm.train_batches_per_epoch == 20 // (2 * 2)
        batches = stream(dm)
        assert len(batches) == 5
        assert all(len(b["key"]) == 2 and b["video"].shape == (2, 3, 8, H, W) for b in batches)
        per_rank.append(keys(batches))
    assert sorted(per_rank[0] + per_rank[1]) == all_keys

    # fewer shards than ranks x workers, an odd count: ceil(9 / 2) batches each, one sample twice
    few = write_shards(tmp_path, "f", [5, 4])
    got = []
    for rank in (0, 1):
        dm = make_dm(few, rank=rank, world_size=2, num_workers=2, batch_size=1)
        batches = stream(dm)
        assert len(batches) == dm.train_batches_per_epoch == 5
        got += keys(batches)
    assert len(got) == 10 and len(set(got)) == 9


def test_broken_samples_are_skipped_and_counted(tmp_path):
    def extras(key, idx, frames):
        kind = {1: "truncated", 3: "zero", 5: "nocaption", 7: "shortctl"}.get(idx)
        if kind == "truncated":
            data = encode_video(frames, FPS)
            return {"mp4": data[: len(data) // 2]}
        if kind == "zero":
            return {"mp4": b"\x00\x00\x00\x18ftypmp42" + bytes(100)}
        if kind == "nocaption":
            return {"txt": None, "json": {"fps": FPS}}
        if kind == "shortctl":
            return {"edge.mp4": encode_video(compute_control("edge", frames[:4]), FPS)}
        if idx % 2 == 0:  # half of the good ones bring their control video, the rest compute it
            return {"edge.mp4": encode_video(compute_control("edge", frames), FPS)}
        return {}

    shards = write_shards(tmp_path, "b", [10], extras)
    dm = make_dm(shards, modality="edge", batch_size=2, batches_per_epoch=3)
    batches = stream(dm)
    assert keys(batches) == ["b00_000", "b00_002", "b00_004", "b00_006", "b00_008", "b00_009"]
    assert [int(b["skipped"]) for b in batches] == [1, 2, 1]
    assert dm.skipped_total == 4
    assert dm.state_dict() == {"epoch": 0, "batches": 3, "skipped_total": 4}
    for b in batches:
        assert b["control"].shape == (2, 3, 8, H, W) and b["control"].dtype == torch.uint8
        assert b["control"].float().mean() > 0  # the square's edges


def test_only_broken_samples_stop_at_setup(tmp_path):
    shards = write_shards(tmp_path, "bad", [3], lambda k, i, f: {"mp4": b"not a video"})
    with pytest.raises(ValueError, match="bad-000000.tar.*all 3 are broken"):
        make_dm(shards, batch_size=1)


def test_epochs_seed_and_resume(tmp_path):
    # 12 samples, 15 batches per epoch: the workers cycle over their shards
    shards = write_shards(tmp_path, "r", [3, 3, 3, 3])
    kw = dict(batch_size=1, num_workers=2, batches_per_epoch=15, modality="edge")
    a = make_dm(shards, **kw)
    e0, e1 = stream(a, epoch=0), stream(a, epoch=1)
    assert len(e0) == len(e1) == 15
    assert keys(e0) != keys(e1)

    b = make_dm(shards, **kw)  # same seed: same stream, same frames and controls
    again = stream(b, epoch=0)
    assert keys(again) == keys(e0)
    for x, y in zip(e0, again):
        assert torch.equal(x["video"], y["video"]) and torch.equal(x["control"], y["control"])
    assert keys(stream(make_dm(shards, seed=1, **kw), epoch=0)) != keys(e0)

    # interrupted after 7 batches (an odd count: the workers' roles rotate on resume)
    c = make_dm(shards, **kw)
    head = stream(c, epoch=0, limit=7)
    state = c.state_dict()
    assert state == {"epoch": 0, "batches": 7, "skipped_total": 0}
    d = make_dm(shards, **kw)
    d.load_state_dict(state)
    tail = stream(d)
    assert keys(head) + keys(tail) == keys(e0)
    assert all(torch.equal(x["video"], y["video"]) for x, y in zip(tail, e0[7:]))
    assert d.state_dict() == {"epoch": 0, "batches": 15, "skipped_total": 0}
    assert keys(stream(d, epoch=1)) == keys(e1)

    # a state at the end of an epoch continues with the next one
    f = make_dm(shards, **kw)
    f.load_state_dict({"epoch": 0, "batches": 15, "skipped_total": 3})
    assert keys(stream(f)) == keys(e1)
    assert f.state_dict() == {"epoch": 1, "batches": 15, "skipped_total": 3}


def test_validation_fixed_finite_disjoint(tmp_path):
    shards = write_shards(tmp_path, "v", [4, 4, 4])
    ordered = [f"v{s:02d}_{j:03d}" for s in range(3) for j in range(4)]
    per_rank = []
    for rank in (0, 1):
        dm = make_dm(
            shards,
            val_shards=shards,
            val_samples=9,
            rank=rank,
            world_size=2,
            num_workers=2,
            batch_size=2,
            modality="edge",
        )
        first, second = list(dm.val_dataloader()), list(dm.val_dataloader())
        assert len(first) == len(dm.val_dataloader()) == 3  # 5 samples per rank: 2 + 2 + 1
        assert keys(first) == keys(second)
        for x, y in zip(first, second):
            assert torch.equal(x["video"], y["video"]) and torch.equal(x["control"], y["control"])
        per_rank.append(keys(first))
    assert per_rank[0] == ordered[0:5]
    assert per_rank[1] == ordered[5:9] + ordered[5:6]  # padded with its own first sample
    assert not set(per_rank[0]) & set(per_rank[1])


def test_latents_and_text_embeddings(tmp_path):
    def tensors(idx):
        g = torch.Generator().manual_seed(idx)
        length = 6 if idx % 2 else 4
        text = {"emb": torch.randn(length, 8, generator=g), "mask": torch.ones(length, dtype=torch.uint8)}
        lat = {"latent": torch.randn(4, 2, 3, 4, generator=g)}
        lat["control.edge"] = torch.randn(4, 2, 3, 4, generator=g)
        return text, lat

    def extras(key, idx, frames):
        text, lat = tensors(idx)
        out = {"text.safetensors": save_safetensors(text), "latent.safetensors": save_safetensors(lat)}
        if idx == 2:
            out["text.safetensors"] = b"\x10\x00\x00\x00\x00\x00\x00\x00{not safetensors"
        if idx == 3:  # an undecodable video: with use_latents it is never decoded
            out.update({"mp4": b"not a video", "json": {"fps": 24.0}})
        if idx == 4:  # a mask still comes for the latents' clip (the first frames)
            out["mask.mp4"] = encode_video(np.full_like(frames, 255), FPS)
        return out

    shards = write_shards(tmp_path, "l", [5], extras)
    dm = make_dm(shards, use_latents=True, use_text_embeddings=True, modality="edge", batch_size=2, batches_per_epoch=2)
    batches = stream(dm)
    assert keys(batches) == ["l00_000", "l00_001", "l00_003", "l00_004"]
    assert dm.skipped_total == 1
    for b, idxs in zip(batches, ([0, 1], [3, 4])):
        assert "video" not in b and "control" not in b
        assert b["latent"].shape == b["control_latent"].shape == (2, 4, 2, 3, 4)
        assert b["text_emb"].shape == (2, 6, 8) and b["text_mask"].shape == (2, 6)
        assert b["text_mask"].dtype == torch.bool
        for i, idx in enumerate(idxs):
            text, lat = tensors(idx)
            n = text["emb"].shape[0]
            assert torch.equal(b["latent"][i], lat["latent"])
            assert torch.equal(b["control_latent"][i], lat["control.edge"])
            assert torch.equal(b["text_emb"][i, :n], text["emb"]) and not b["text_emb"][i, n:].any()
            assert b["text_mask"][i].tolist() == [True] * n + [False] * (6 - n)
    assert batches[1]["fps"].tolist() == [24.0, FPS]
    assert "mask" not in batches[0] and batches[1]["mask"].shape == (2, 1, 8, H, W)

    # text embeddings alongside decoded video
    dm = make_dm(shards, use_text_embeddings=True, batch_size=2, batches_per_epoch=1)
    (b,) = stream(dm)
    assert b["video"].shape == (2, 3, 8, H, W) and b["text_emb"].shape == (2, 6, 8)


def test_mask_all_or_nothing(tmp_path):
    def extras(key, idx, frames):
        if idx != 0:
            return {}
        m = np.zeros_like(frames)
        m[:, :, : W // 2] = 255
        return {"mask.mp4": encode_video(m, FPS)}

    shards = write_shards(tmp_path, "m", [2], extras)
    (b,) = stream(make_dm(shards, batch_size=2, batches_per_epoch=1))
    assert b["mask"].shape == (2, 1, 8, H, W) and b["mask"].dtype == torch.float32
    assert b["mask"][0, :, :, :, : W // 2 - 2].eq(1).all() and b["mask"][0, :, :, :, W // 2 + 2 :].eq(0).all()
    assert b["mask"][1].eq(1).all()  # no mask.mp4: ones


class _Recorder(lightning.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[tuple[int, str]] = []

    def training_step(self, batch, batch_idx):
        self.seen += [(self.current_epoch, k) for k in batch["key"]]
        return (self.w * batch["video"].float().mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _trainer(tmp_path, **kw):
    args = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    args.update(kw)
    return lightning.Trainer(**args)


@pytest.mark.filterwarnings("ignore:.*`IterableDataset` has `__len__`", "ignore:.*dataloader is not resumable")
@pytest.mark.filterwarnings("ignore:.*no `validation_step`", "ignore:.*callbacks used to create the checkpoint")
def test_with_lightning_trainer_epochs_and_resume(tmp_path):
    shards = write_shards(tmp_path, "t", [3, 3, 3])
    kw = dict(batch_size=1, num_workers=0)
    expected = [(e, k) for e in (0, 1) for k in keys(stream(make_dm(shards, **kw), epoch=e))]

    dm, model = make_dm(shards, **kw), _Recorder()
    _trainer(tmp_path, max_epochs=2, enable_checkpointing=False).fit(model, datamodule=dm)
    assert model.seen == expected  # trainer.current_epoch drives the stream
    assert dm.state_dict() == {"epoch": 1, "batches": 9, "skipped_total": 0}

    ckpt = lightning.pytorch.callbacks.ModelCheckpoint(tmp_path / "ck", every_n_train_steps=4, save_top_k=-1)
    _trainer(tmp_path, max_steps=4, callbacks=[ckpt]).fit(_Recorder(), datamodule=make_dm(shards, **kw))
    dm, model = make_dm(shards, **kw), _Recorder()
    _trainer(tmp_path, max_epochs=2, enable_checkpointing=False).fit(
        model, datamodule=dm, ckpt_path=str(tmp_path / "ck" / "epoch=0-step=4.ckpt")
    )
    assert model.seen == expected[4:]


def test_keypoints_rendered_from_json(tmp_path):
    def extras(key, idx, frames):
        pts = [[[4 + t + k, 3 + k] for k in range(17)] for t in range(T_SRC)]  # (T, 17, 2) pixels
        return {"keypoint.json": json.dumps(pts).encode()} if idx == 0 else {}

    shards = write_shards(tmp_path, "k", [2], extras)
    dm = make_dm(shards, modality="keypoint", batch_size=1, batches_per_epoch=2)
    batches = stream(dm)
    assert keys(batches) == ["k00_000", "k00_000"]  # k00_001 has no keypoints: skipped, cycled
    assert batches[0]["control"].shape == (1, 3, 8, H, W) and batches[0]["control"].float().mean() > 0
    assert dm.skipped_total == 1


def test_damaged_shard_is_skipped(tmp_path):
    good = write_shards(tmp_path, "g", [3])
    (bad,) = write_shards(tmp_path, "x", [3])
    data = open(bad, "rb").read()
    with open(bad, "wb") as f:
        f.write(data[:3000])  # mid-member: "unexpected end of data"
    dm = make_dm([*good, bad], batch_size=1, batches_per_epoch=8)  # more than one pass
    batches = stream(dm)
    assert len(batches) == 8 and dm.skipped_total >= 1
    assert {k for k in keys(batches)} >= {"g00_000", "g00_001", "g00_002"}
