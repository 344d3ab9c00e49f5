"""Bad numbers, bad data and bad specs: NaN/Inf on one rank of two (every rank skips together,
weights never take a NaN, N in a row stop the run with a checkpoint), broken samples skipped and
counted while training continues on fewer shards than ranks x workers, and inference specs with
each kind of mistake refused with the field named and nothing written."""

from __future__ import annotations

import csv
import json
import socket
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from modules.checkpoint import checkpoint_step, latest_checkpoint
from tests.helpers import PATIENCE_S
from tests.helpers.faults import read_record
from tests.helpers.reliability import SIZE, recipe, teacher, video_shards
from tests.helpers.zygote import Zygote


@pytest.fixture(scope="module")
def zygote():
    with Zygote() as z:
        yield z


def fit2(zygote, cfg: Path, env: dict | None = None, timeout: float = PATIENCE_S) -> list[tuple[int, str]]:
    """`vidistill fit` on 2 gloo ranks (TorchElastic's environment, as torchrun sets it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    runs = []
    for rank in (0, 1):
        dist_env = {
            "RANK": rank,
            "LOCAL_RANK": rank,
            "GROUP_RANK": 0,
            "WORLD_SIZE": 2,
            "LOCAL_WORLD_SIZE": 2,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "TORCHELASTIC_RUN_ID": "test",
        }
        runs.append(
            zygote.start(["fit", "--config", cfg], cfg.parent / f"log.rank{rank}", dict(dist_env, **(env or {})))
        )
    return [(r.wait(timeout), r.output()) for r in runs]


# --------------------------------------------------------------------------------------------
# non-finite losses and gradients
# --------------------------------------------------------------------------------------------


def test_nan_loss_and_inf_grad_on_one_rank_are_skipped_by_both(zygote, tmp_path):
    data = video_shards(tmp_path / "data")
    cfg = recipe("control", tmp_path / "run", data, steps=5, every=100, devices=2)
    # rank 1's loss is NaN at step 2, rank 0's local gradient shard has an Inf at step 4
    (rc0, out0), (rc1, out1) = fit2(zygote, cfg, {"VIDISTILL_NAN": "1:1:loss,0:3:grad"})
    assert rc0 == rc1 == 0, out0 + out1
    rows = [read_record(str(tmp_path / "run" / "losses.jsonl"), r) for r in (0, 1)]
    for r in rows:
        assert [x["skipped"] for x in r] == [False, True, False, True, False]  # the ranks agree
        assert all(x["finite"] for x in r)  # no weight ever took a NaN
        for prev, x in zip(r, r[1:]):  # a skipped step changes no weight; the others do
            assert (x["digest"] == prev["digest"]) == x["skipped"]
        assert r[-1]["nonfinite_total"] == 2 and r[-1]["metric_nonfinite"] == 2.0  # counted and logged
    print("NaN loss on rank 1 at step 2, Inf gradient on rank 0 at step 4: both ranks skipped both steps")


def test_n_nonfinite_steps_in_a_row_stop_with_a_checkpoint(zygote, tmp_path):
    data = video_shards(tmp_path / "data")
    cfg = recipe("control", tmp_path / "run", data, steps=8, every=100, devices=2, model={"max_nonfinite_steps": 2})
    results = fit2(zygote, cfg, {"VIDISTILL_NAN": "1:2:loss,1:3:loss"})
    for rc, out in results:
        assert rc == 1, out
        assert "NonFiniteError: stopped: 2 optimizer steps in a row (steps 3..4)" in out, out[-3000:]
    ckpt = latest_checkpoint(tmp_path / "run" / "ckpt")
    assert ckpt.name == "nonfinite-step=4.ckpt" and checkpoint_step(ckpt) == 4
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(ckpt, tmp_path / "full.pt")
    state = torch.load(tmp_path / "full.pt", weights_only=False)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values() if torch.is_tensor(v) and v.is_floating_point())
    print(f"2 NaN steps in a row: both ranks stopped with NonFiniteError, finite checkpoint {ckpt.name}")


def _dmd2_and_kd_modules(tmp_path):
    from tests.test_distill_stages import dmd2

    return dmd2(tmp_path, ema_decay=0.9)


class _Poison(__import__("lightning").Callback):
    """In-process: NaN loss at the given steps (single rank)."""

    def __init__(self, steps):
        self.steps, self.rows = set(steps), []

    def on_before_backward(self, trainer, module, loss):
        pass

    def on_after_backward(self, trainer, module):
        if trainer.global_step in self.steps:
            for p in module.parameters():
                if p.grad is not None:
                    p.grad.view(-1)[0] = float("nan")
                    break

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.before = {
            n: {k: v.clone() for k, v in getattr(module, n).state_dict().items()}
            for n in ("student", "fake_score", "gan_head", "ema")
        }

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        moved = {
            n: any(not torch.equal(v, getattr(module, n).state_dict()[k]) for k, v in s.items())
            for n, s in self.before.items()
        }
        self.rows.append((trainer.global_step, module._skipped_step, moved))


def test_dmd2_turns_skip_a_nan_student_and_critic_turn(tmp_path):
    from tests.test_distill_stages import trainer

    module = _dmd2_and_kd_modules(tmp_path)
    poison = _Poison({3, 4})  # turn 3 is a student turn (freq 3), turn 4 a critic turn
    tr = trainer(6, [poison])
    tr.fit(module, __import__("tests.helpers.latents", fromlist=["loader"]).loader(6, 2))
    assert tr.global_step == 6 and module.nonfinite_total == 2
    for step, skipped, moved in poison.rows:
        assert skipped == (step in (4, 5)), (step, skipped)  # rows carry the step after the turn
        if skipped:
            assert not any(moved.values()), (step, moved)  # nothing moved, EMA included
    assert all(torch.isfinite(p).all() for p in module.parameters())


# --------------------------------------------------------------------------------------------
# broken data
# --------------------------------------------------------------------------------------------


def broken_shard(folder: Path) -> tuple[str, int]:
    """One shard of 14 samples, 6 of them broken in a different way each."""
    import webdataset as wds

    from datamodules.codec import encode_video
    from datamodules.controls import compute_control
    from datamodules.synthetic import synthetic_clip

    folder.mkdir(parents=True)
    broken = 0
    with wds.TarWriter(str(folder / "train-000000.tar")) as tw:
        for i in range(14):
            frames = np.ascontiguousarray(
                synthetic_clip(__import__("random").Random(i), num_frames=6, height=SIZE, width=SIZE)[0]
            )
            mp4 = encode_video(frames, 8.0)
            s = {"__key__": f"s{i:03d}", "mp4": mp4, "txt": b"a moving shape"}
            kind = i % 2 and (i // 2) % 7
            if kind == 1:  # truncated mp4
                s["mp4"] = mp4[: len(mp4) // 3]
            elif kind == 2:  # zero frames: a header and nothing else
                s["mp4"] = b"\x00\x00\x00\x18ftypmp42" + bytes(64)
            elif kind == 3:  # shorter than the 4 frames asked for
                s["mp4"] = encode_video(frames[:2], 8.0)
            elif kind == 4:  # no caption
                del s["txt"]
            elif kind == 5:  # control video of another size than its clip
                s["edge.mp4"] = encode_video(
                    compute_control("edge", np.stack([np.pad(f, ((0, 8), (0, 8), (0, 0))) for f in frames])), 8.0
                )
            elif kind == 6:  # unreadable member: json that is not json
                s["json"] = b"\xff{not json"
            broken += bool(kind)
            tw.write(s)
    return str(folder), broken


def test_broken_samples_are_skipped_counted_and_logged_on_one_shard_for_two_ranks(zygote, tmp_path):
    """Fewer shards (1) than ranks x workers (2 x 1): no hang; every broken sample skipped and
    counted in the logged data/skipped metric; training runs to the end."""
    data, broken = broken_shard(tmp_path / "data")
    cfg = recipe(
        "control",
        tmp_path / "run",
        data,
        steps=3,
        every=100,
        devices=2,
        datamodule={"num_workers": 1, "batches_per_epoch": 3, "batch_size": 1},
        trainer={
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(tmp_path / "logs"), "name": "csv"},
            },
            "log_every_n_steps": 1,
        },
    )
    results = fit2(zygote, cfg)
    for rc, out in results:
        assert rc == 0, out
    assert all(len(read_record(str(tmp_path / "run" / "losses.jsonl"), r)) == 3 for r in (0, 1))
    rows = list(csv.DictReader(open(next((tmp_path / "logs").rglob("metrics.csv")))))
    skipped = sum(float(r["data/skipped"]) for r in rows if r.get("data/skipped"))
    assert skipped >= 1, rows
    # the same sample stream outside training: each broken kind is skipped, never delivered
    from datamodules.video import VideoDataModule

    total = 0
    for rank in (0, 1):
        dm = VideoDataModule(
            data,
            batch_size=1,
            num_workers=0,
            num_frames=4,
            height=SIZE,
            width=SIZE,
            modality="edge",
            batches_per_epoch=3,
            rank=rank,
            world_size=2,
        )
        dm.setup("fit")
        for b in dm.train_dataloader():
            dm.on_after_batch_transfer(b, 0)
            assert int(b["key"][0][1:]) % 2 == 0 or (int(b["key"][0][1:]) // 2) % 7 == 0, b["key"]
        total += dm.skipped_total
    assert total == skipped
    print(
        f"{broken} broken samples in 1 shard for 2 ranks x 1 worker: {int(skipped)} met and skipped, "
        "data/skipped logged, training finished"
    )


# --------------------------------------------------------------------------------------------
# inference specs
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def infer_inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("infer")
    from datamodules.codec import write_video

    write_video(d / "input.mp4", np.full((4, SIZE, SIZE, 3), 90, np.uint8), 8.0)
    return d, teacher(d / "model")


GOOD = {
    "name": "ok",
    "prompt": "a square",
    "video_path": "input.mp4",
    "resolution": f"{SIZE}x{SIZE}",
    "max_frames": 2,
    "num_steps": 1,
    "guidance": 0,
    "edge": {},
}


@pytest.mark.parametrize(
    "change, field, words",
    [
        ({"num_steps": "4"}, "num_steps", "expected an integer"),
        ({"seed": 1.5}, "seed", "expected an integer"),
        ({"show_input": "yes"}, "show_input", "expected true or false"),
        ({"edge": {"control_weight": "1"}}, "edge.control_weight", "expected a number"),
        ({"video_path": "missing.mp4"}, "video_path", "file not found"),
        ({"edge": {"control_path": "nope.mp4"}}, "edge.control_path", "file not found"),
        ({"lidar": {"control_path": "input.mp4"}}, "lidar", "unknown control modality"),
        ({"edge": {"control_weight": 1.5}}, "edge.control_weight", "between 0 and 1"),
        ({"edge": {"control_weight": -0.1}}, "edge.control_weight", "between 0 and 1"),
        ({"num_stepz": 4}, "num_stepz", "unknown key (did you mean 'num_steps'?)"),
    ],
)
def test_bad_spec_field_is_named_exit_nonzero_nothing_written(infer_inputs, tmp_path, change, field, words):
    from tools.cli import main

    d, model = infer_inputs
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({**GOOD, **change}))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as err:
        main(["infer", "-i", str(spec), "-o", str(out), "--model", model, "--disable-guardrails"])
    message = str(err.value.code)
    assert err.value.code not in (0, None)  # a string code: the process exits with status 1
    assert f"field {field!r}: " in message and words in message, message
    assert not out.exists()


def test_unreadable_tar_header_skips_the_rest_of_the_shard(tmp_path):
    """A tar whose second member header is garbage: the shard's rest is skipped and counted."""
    from datamodules.video import VideoDataModule
    from tests.test_datamodule import write_shards

    (good,) = write_shards(tmp_path, "g", [3])
    (bad,) = write_shards(tmp_path, "x", [3])
    raw = bytearray(open(bad, "rb").read())
    with tarfile.open(bad) as tar:
        second = tar.getmembers()[2].offset  # header of sample 1's first member
    raw[second : second + 512] = b"\x7f" * 512
    open(bad, "wb").write(bytes(raw))
    dm = VideoDataModule(
        [good, bad], batch_size=1, num_workers=0, num_frames=8, height=24, width=32, modality=None, batches_per_epoch=6
    )
    dm.setup("fit")
    keys = [k for b in dm.train_dataloader() for k in dm.on_after_batch_transfer(b, 0)["key"]]
    assert len(keys) == 6 and dm.skipped_total >= 1 and "x00_001" not in keys
