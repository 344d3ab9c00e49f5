"""Tiny recipes, shards and subprocess runs of `vidistill fit` for the reliability tests: the
real CLI, FSDP2 strategy, datamodule and checkpoints, at a size that trains a step in well under
a second on one CPU core (tiny preset, 4-frame 16x16 clips, pixel tokenizer, fp32)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from modules.stages.base import OPTIONS
from tests.helpers import PATIENCE_S

ROOT = Path(__file__).resolve().parents[2]
FRAMES, SIZE = 4, 16
PIXEL = {"kind": "pixel", "options": {"spatial": 2}}  # 12 latent channels
FP32 = {"param_dtype": "float32", "checkpointing": "none"}


def video_shards(folder: Path, samples: int = 8, per_shard: int = 4) -> str:
    """Synthetic clips with captions (controls are computed on the fly)."""
    from datamodules.synthetic import write_synthetic_shards

    write_synthetic_shards(
        str(folder),
        num_samples=samples,
        samples_per_shard=per_shard,
        num_frames=FRAMES,
        height=SIZE,
        width=SIZE,
        controls=(),
        progress=False,
        floors=("plain",),
    )
    return str(folder)


def teacher(folder: Path) -> str:
    """A tiny edge-controlled network (non-zero control branch) that fits PIXEL and the tiny text encoder."""
    from modules.denoiser import Denoiser
    from modules.nets import preset
    from modules.sampling import GenerationSettings

    cfg = preset("tiny", latent_channels=12)
    cfg.control.channels, cfg.modalities = 12, ["edge"]
    net = Denoiser.build(cfg, seed=0)
    with torch.no_grad():
        for p in net.controls.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(7)))
    net.save_pretrained(folder)
    GenerationSettings(tokenizer=dict(PIXEL, path=None), text={"encoder": "tiny", "max_length": 16}).save(folder)
    return str(folder)


def kd_shards(folder: Path, samples: int = 8, per_shard: int = 4) -> str:
    """KD shards as make-kd-data writes them (random teacher states; the stage cannot tell)."""
    import webdataset as wds
    from safetensors.torch import save

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    lat = (12, FRAMES, SIZE // 2, SIZE // 2)
    times = torch.tensor([1.0, 0.9375, 0.8333333, 0.625])
    for s in range(samples // per_shard):
        with wds.TarWriter(str(folder / f"kd-{s:06d}.tar")) as tw:
            for j in range(per_shard):
                kd = {
                    "noise": torch.randn(*lat, generator=g),
                    "x0": torch.randn(*lat, generator=g),
                    "t": times,
                    "control.edge": torch.randint(0, 256, (3, FRAMES, SIZE, SIZE), generator=g, dtype=torch.uint8),
                }
                kd["states"] = torch.stack([kd["noise"]] + [torch.randn(*lat, generator=g) for _ in range(3)])
                text = {"emb": torch.randn(6, 32, generator=g), "mask": torch.ones(6, dtype=torch.uint8)}
                tw.write(
                    {
                        "__key__": f"kd{s}_{j}",
                        "kd.safetensors": save(kd),
                        "text.safetensors": save(text),
                        "json": json.dumps({"caption": "a clip", "fps": 8.0}).encode(),
                    }
                )
    return str(folder)


def recipe(
    stage: str,
    root: Path,
    data: str,
    teacher_dir: str | None = None,
    steps: int = 6,
    every: int = 2,
    devices: int = 1,
    model: dict | None = None,
    datamodule: dict | None = None,
    trainer: dict | None = None,
) -> Path:
    """Write `root/recipe.yaml` for `stage` (control, kd or dmd2): `steps` optimizer steps,
    an (atomic, via the CLI) checkpoint every `every` steps plus last, losses recorded by Faults."""
    root.mkdir(parents=True, exist_ok=True)

    def options(**kw) -> dict:  # the StageOptions every stage takes
        return {"options": {"tokenizer": PIXEL, "sharding": FP32, "seed": 0, "export_to": str(root / "export"), **kw}}

    models = {
        "control": {
            "class_path": "modules.stages.ControlTraining",
            "init_args": dict(
                options(text={"encoder": "tiny", "max_length": 16}, ema_decay=0.9),
                modality="edge",
                optim={"lr": 1e-3, "warmup_steps": 1},
            ),
        },
        "kd": {
            "class_path": "modules.stages.KDWarmup",
            "init_args": dict(
                options(text={"encoder": "none"}),
                student={"init_from": teacher_dir},
                modality="edge",
                optim={"lr": 1e-3, "warmup_steps": 1},
            ),
        },
        "dmd2": {
            "class_path": "modules.stages.DMD2",
            "init_args": dict(
                options(text={"encoder": "tiny", "max_length": 16}, ema_decay=0.9),
                teacher={"init_from": teacher_dir},
                modality="edge",
                guidance=1.0,
                student_update_freq=3,
                gan={"weight": 0.1, "critic_weight": 0.1, "taps": [1], "hidden": 16},
                student_optim={"lr": 1e-3, "warmup_steps": 1},
                critic_optim={"lr": 1e-3, "warmup_steps": 1},
            ),
        },
    }
    m = models[stage]
    for key, value in (model or {}).items():  # StageOptions fields go under options
        (m["init_args"]["options"] if key in OPTIONS else m["init_args"])[key] = value
    dm = {
        "train_shards": data,
        "batch_size": 2,
        "num_workers": 0,
        "num_frames": FRAMES,
        "height": SIZE,
        "width": SIZE,
        "modality": "edge",
        "batches_per_epoch": 3,
        "seed": 0,
    }
    if stage == "kd":
        dm.update(use_kd=True, use_text_embeddings=True)
    dm.update(datamodule or {})
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": devices,
            "max_steps": steps,
            "limit_val_batches": 0,
            "num_sanity_val_steps": 0,
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "deterministic": True,
            "default_root_dir": str(root),
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {
                        "dirpath": str(root / "ckpt"),
                        "every_n_train_steps": every,
                        "save_top_k": -1,
                        "save_last": True,
                    },
                },
                {"class_path": "tests.helpers.faults.Faults", "init_args": {"record": str(root / "losses.jsonl")}},
            ],
        },
        "model": m,
        "data": {"class_path": "datamodules.video.VideoDataModule", "init_args": dm},
    }
    config["trainer"].update(trainer or {})
    path = root / "recipe.yaml"
    path.write_text(json.dumps(config, indent=1))  # JSON is YAML
    return path


def fit(
    config: Path, *args: str, nproc: int = 1, env: dict | None = None, timeout: int = PATIENCE_S, popen: bool = False
):
    """Run `vidistill fit --config CONFIG ARGS` in a subprocess (torchrun for nproc > 1)."""
    cli = ["-m", "tools.cli", "fit", "--config", str(config), *args]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *cli]
    else:
        cmd = [sys.executable, *cli]
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(env or {}))
    if popen:
        return subprocess.Popen(
            cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


def output(proc) -> str:
    return (proc.stdout or "")[-4000:] + (proc.stderr or "")[-6000:]
