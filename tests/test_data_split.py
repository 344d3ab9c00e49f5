"""Every good clip exactly once per epoch on any layout of ranks x workers: the probe at setup,
its cache, the split of the good samples, the skip counter and the mid-epoch resume, on tiny
video2dataset-layout shards ({key}.mp4 + {key}.json; 4-frame 32x48 clips)."""

from __future__ import annotations

import io
import json
import math
import random
import shutil
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch

from datamodules import shards as shards_module
from datamodules.codec import encode_video
from datamodules.sample import SampleLoader
from datamodules.shards import PROBE_CACHE_ENV, Split
from datamodules.video import VideoDataModule
from tests.test_datamodule import keys, stream

T, H, W, FPS = 4, 32, 48, 8.0
BROKEN = ("truncated", "tiny", "short", "nocaption", "notvideo")


@pytest.fixture(autouse=True)
def probe_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(PROBE_CACHE_ENV, str(tmp_path / "probe-cache"))
    shards_module._PROBES.clear()


def frames_for(idx: int, t: int = T, h: int = H, w: int = W) -> np.ndarray:
    frames = np.empty((t, h, w, 3), np.uint8)
    for i in range(t):
        frames[i] = (idx * 41 + i * 7) % 180 + 20
        x = (idx * 5 + i * 3) % max(1, w - 8)
        frames[i, h // 4 : h // 4 + 8, x : x + 8] = 255
    return frames


def member(kind: str, idx: int) -> dict[str, bytes]:
    """The members of one video2dataset sample of a kind (ok or one of BROKEN)."""
    mp4 = encode_video(frames_for(idx), FPS)
    meta = {"caption": f"clip {idx}", "fps": FPS, "status": "success"}
    if kind == "truncated":
        mp4 = mp4[: len(mp4) // 2]
    elif kind == "tiny":  # 2x2 pixels: would be upscaled to 32x48
        mp4 = encode_video(frames_for(idx, h=2, w=2), FPS)
    elif kind == "short":  # 2 frames of the 4 asked for
        mp4 = encode_video(frames_for(idx, t=2), FPS)
    elif kind == "nocaption":
        del meta["caption"]
    elif kind == "notvideo":
        mp4 = b"not a video"
    return {"mp4": mp4, "json": json.dumps(meta).encode()}


def v2d_shards(folder, layout: list[list[str]]) -> tuple[list[str], list[str], int]:
    """Shards ``{s:05d}.tar`` with the given kinds of samples (keys ``{idx:09d}``).
    Returns (paths, the good keys, the number of broken samples)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths, good, broken, idx = [], [], 0, 0
    for s, kinds in enumerate(layout):
        path = folder / f"{s:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for kind in kinds:
                key = f"{idx:09d}"
                for ext, data in member(kind, idx).items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                if kind == "ok":
                    good.append(key)
                else:
                    broken += 1
                idx += 1
        paths.append(str(path))
    return paths, good, broken


CLEAN = [["ok"] * 4] * 3  # the held-out case of the issue: 3 shards of 4 clean clips
UNEVEN = [  # 11 good, 6 broken; one shard all broken, broken samples first and last
    ["ok"] * 5,
    ["tiny", "ok", "ok", "truncated"],
    ["notvideo", "short"],
    ["ok", "ok", "nocaption", "ok"],
    ["ok", "notvideo"],
    ["ok"],
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("split")
    return {"clean": v2d_shards(root / "clean", CLEAN), "broken": v2d_shards(root / "broken", UNEVEN)}


def make_dm(shards, **kw) -> VideoDataModule:
    args = dict(num_frames=T, height=H, width=W, modality=None, num_workers=0, batch_size=1, seed=0)
    args.update(kw)
    dm = VideoDataModule(shards, **args)
    dm.setup("fit")
    return dm


# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, batch_size", [("clean", 1), ("broken", 2)])
@pytest.mark.parametrize("workers", [0, 1, 2])
@pytest.mark.parametrize("world", [1, 2])
def test_every_good_key_once_per_epoch(data, name, batch_size, workers, world):
    paths, good, broken = data[name]
    per_batches = math.ceil(len(good) / (world * batch_size))
    for epoch in (0, 1):
        got, skipped = [], 0
        for rank in range(world):
            dm = make_dm(paths, rank=rank, world_size=world, num_workers=workers, batch_size=batch_size)
            batches = stream(dm, epoch=epoch)
            assert len(batches) == dm.train_batches_per_epoch == per_batches  # equal on every rank
            assert all(len(b["key"]) == batch_size and b["video"].shape[1:] == (3, T, H, W) for b in batches)
            assert dm.skipped_total == sum(int(b["skipped"]) for b in batches)
            got += keys(batches)
            skipped += dm.skipped_total
        counts = Counter(got)
        assert sorted(counts) == sorted(good), f"epoch {epoch}: missing {set(good) - set(counts)}"
        repeats = len(got) - len(good)  # only to complete the last batches
        assert len(got) == per_batches * world * batch_size and repeats < world * batch_size
        assert sum(n - 1 for n in counts.values()) == repeats
        assert skipped == broken


def test_resume_mid_epoch_continues_exactly(data):
    paths, good, broken = data["broken"]
    kw = dict(world_size=2, num_workers=2, batch_size=1, modality="edge")
    for rank in (0, 1):
        full = stream(make_dm(paths, rank=rank, **kw), epoch=0)
        assert len(full) == 6
        a = make_dm(paths, rank=rank, **kw)
        head = stream(a, epoch=0, limit=3)  # an odd count: the workers' roles rotate
        state = a.state_dict()
        assert state["batches"] == 3
        b = make_dm(paths, rank=rank, **kw)
        b.load_state_dict(state)
        tail = stream(b)
        assert keys(head) + keys(tail) == keys(full)
        for x, y in zip(head + tail, full):
            assert torch.equal(x["video"], y["video"]) and torch.equal(x["control"], y["control"])
            assert int(x["skipped"]) == int(y["skipped"])
        assert b.state_dict() == {"epoch": 0, "batches": 6, "skipped_total": sum(int(y["skipped"]) for y in full)}


def test_clips_do_not_depend_on_the_layout(data):
    """A sample's random clip and control parameters come from (seed, epoch, sample)."""
    paths, good, _ = data["broken"]
    kw = dict(batch_size=1, modality="edge", num_frames=2)  # 2 of 4 frames: the start is random
    one = {k: b for b in stream(make_dm(paths, **kw), epoch=1) for k in b["key"]}
    many: dict[str, list] = {}
    for rank in (0, 1):
        for b in stream(make_dm(paths, rank=rank, world_size=2, num_workers=2, **kw), epoch=1):
            many.setdefault(b["key"][0], []).append(b)
    for key in good:
        if len(many[key]) == 1:  # a repeated sample is drawn again (its second pass)
            assert torch.equal(many[key][0]["video"], one[key]["video"])
            assert torch.equal(many[key][0]["control"], one[key]["control"])


def test_probe_cache_and_what_it_finds(tmp_path, monkeypatch):
    paths, good, broken = v2d_shards(tmp_path / "d", [["ok", "tiny", "ok"], ["ok", "short"]])
    reads: list[str] = []
    real = shards_module.read_samples

    def counting(url, indices=None):
        if indices is None:  # the probe reads whole shards
            reads.append(url)
        return real(url, indices)

    monkeypatch.setattr(shards_module, "read_samples", counting)
    dm = make_dm(paths)
    assert dm.train_batches_per_epoch == 3 and len(reads) == 2
    assert sorted(keys(stream(dm))) == good and dm.skipped_total == 2
    assert len(list((tmp_path / "probe-cache").iterdir())) == 2

    shards_module._PROBES.clear()  # a new process: the disk cache answers
    make_dm(paths)
    assert len(reads) == 2
    make_dm(paths, num_frames=2)  # other requirements: probed again (the short clip is good now)
    assert len(reads) == 4 and make_dm(paths, num_frames=2).train_batches_per_epoch == 4
    make_dm(paths, height=16, width=24)  # the 2x2 clip is still too small
    assert len(reads) == 6

    (new,), _, _ = v2d_shards(tmp_path / "e", [["ok", "ok", "ok"]])  # a changed shard: probed again
    shutil.copyfile(new, paths[0])
    shards_module._PROBES.clear()
    assert make_dm(paths).train_batches_per_epoch == 4
    assert len(reads) == 7

    monkeypatch.setenv(PROBE_CACHE_ENV, "off")
    shards_module._PROBES.clear()
    make_dm(paths)
    assert len(reads) == 9


def test_sample_failing_after_the_probe_is_counted_and_replaced(tmp_path, monkeypatch):
    """Frames that do not decode behind a good header: met at load time, counted, and the
    worker's own first sample fills its place, so the batch count holds."""
    paths, _, _ = v2d_shards(tmp_path / "d", [["ok", "notvideo", "ok", "ok"]])
    monkeypatch.setattr(SampleLoader, "check", lambda self, raw: None)  # the probe sees no fault
    dm = make_dm(paths)
    batches = stream(dm)
    assert len(batches) == dm.train_batches_per_epoch == 4
    assert keys(batches) == ["000000000", "000000002", "000000003", "000000000"]
    assert dm.skipped_total == 1


@pytest.mark.parametrize("seed", range(4))
def test_split_covers_each_good_sample_once_on_any_layout(seed):
    """The split alone (no decoding), over random shard layouts: positions of all ranks x
    workers hold each good sample once in pass 0, repeats only in the last global batch, every
    broken sample reported once, and each worker reads only neighbouring shards, each in one run."""
    rng = random.Random(seed)
    counts = [rng.randint(0, 7) for _ in range(rng.randint(1, 9))]
    bad = [sorted(rng.sample(range(c), rng.randint(0, c))) for c in counts]
    if sum(c - len(b) for c, b in zip(counts, bad)) == 0:
        bad[counts.index(max(counts))] = []
    if max(counts) == 0:
        counts[0], bad[0] = 1, []
    split = Split(counts, bad)
    good = {(s, i) for s, c in enumerate(counts) for i in range(c) if i not in bad[s]}
    assert split.total == len(good) and split.broken == sum(map(len, bad))
    for world in (1, 2, 3):
        for workers in (1, 2, 3):
            for bs in (1, 2):
                bpe = math.ceil(split.total / (world * bs))
                seen, reported = [], 0
                for rank in range(world):
                    for w in range(workers):
                        quota = bpe // workers + (w < bpe % workers)
                        first = rank * bpe + w * (bpe // workers) + min(w, bpe % workers)
                        refs = list(split.refs(seed, 3, first * bs, (first + quota) * bs))
                        assert len(refs) == quota * bs
                        runs = [(r.shard, r.cycle) for r in refs]
                        runs = [x for j, x in enumerate(runs) if j == 0 or runs[j - 1] != x]
                        assert len(runs) == len(set(runs))  # one read per shard and pass
                        mine = [s for s, c in runs if c == 0]  # neighbours in the epoch's shard order
                        order = [s for s in split.order(seed, 3) if split.good[s]]
                        if mine:
                            at = order.index(mine[0])
                            assert order[at : at + len(mine)] == mine
                        seen += [(r.shard, r.index, r.cycle) for r in refs]
                        reported += sum(r.broken for r in refs)
                assert {(s, i) for s, i, c in seen if c == 0} == good
                assert len([x for x in seen if x[2] == 0]) == len(good)
                assert len(seen) - len(good) < world * bs
                assert reported == split.broken
