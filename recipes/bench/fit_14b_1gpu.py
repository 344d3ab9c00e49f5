"""The 14b recipe through `vidistill fit` on one H200, against its memory plan (a benchmark: it
prints the peak and the plan's states; it needs a GPU of more than 120 GiB).

    python recipes/bench/fit_14b_1gpu.py [OUT_DIR]

FSDP2 on one process keeps every state whole: 8x the plan's per-GPU states (85.3 GiB), on a small
clip of synthetic latents (3 latent frames of 16 x 16, random 100352-wide text) with the network
built from the preset (seeded, no weights read); three control-training steps. Measured on one
H200 (docs/benchmarks.md): peak 91.8 GiB against 85.3 GiB of states.
"""

import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "transfer2.5-14b" / "edge" / "control.yaml"
GiB = 2**30


def main(out: Path) -> None:
    if not torch.cuda.is_available() or torch.cuda.get_device_properties(0).total_memory <= 120 * GiB:
        sys.exit("needs a GPU of more than 120 GiB (an H200)")
    data = out / "latents"
    shards = [sys.executable, "-m", "tools.cli", "make-shards", "--synthetic", "latent", "--out", str(data)]
    shards += ["--num_samples", "2", "--latent_shape", "16x3x16x16", "--text_shape", "8x100352", "--controls", "edge"]
    subprocess.run(shards + ["--progress", "false"], cwd=ROOT, check=True)
    callbacks = '[{"class_path": "trainers.callbacks.Throughput", "init_args": {"every": 1}}]'
    overrides = {
        "trainer.devices": "1",
        "trainer.strategy.init_args.context_parallel_size": "1",
        "trainer.max_steps": "3",
        "trainer.limit_val_batches": "0",
        "trainer.enable_checkpointing": "false",
        "trainer.logger": "false",
        "trainer.callbacks": callbacks,
        "trainer.default_root_dir": str(out),
        "model.init_args.net.init_from": "",  # empty, not null: "null" reaches NetSpec as "None" here
        "model.init_args.options.tokenizer.kind": "none",
        "model.init_args.options.export_to": "",  # no export (64 GB)
        "data.init_args.train_shards": str(data),
        "data.init_args.val_shards": str(data),
        "data.init_args.use_latents": "true",
        "data.init_args.num_frames": "9",
        "data.init_args.height": "128",
        "data.init_args.width": "128",
        "data.init_args.num_workers": "0",
    }
    cmd = [sys.executable, "-m", "tools.cli", "fit", "--config", str(RECIPE)]
    cmd += [f"--{k}={v}" for k, v in overrides.items()]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=540)
    log = proc.stdout + proc.stderr
    if proc.returncode:
        sys.exit(log[-6000:])
    peak = max(float(v) for v in re.findall(r"peak_mem_GiB ([\d.]+)", log))
    total, branch = 16074673152, 1706626048  # the 14b preset's parameters and its control branch's
    states = (4 * total + 16 * branch) / GiB  # weights, grads, AdamW and EMA, one GPU: 85.3 GiB
    print(f"14b control step on one GPU: peak {peak:.1f} GiB, states {states:.1f} GiB (plan)")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp()))
