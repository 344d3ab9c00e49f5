"""`fabric run` (the successor of Lightning 1.x's `lightning run`) launches our CLI on several
processes: it starts them through torchrun and Lightning's Trainer picks them up."""

import subprocess
import sys
import sysconfig
from pathlib import Path

from tools.make_shards import make_shards

ROOT = Path(__file__).resolve().parents[1]


def test_fabric_run_launches_two_processes(tmp_path):
    for split, n, seed in (("train", 16, 0), ("val", 4, 1)):
        make_shards(
            out=str(tmp_path / split),
            synthetic="video",
            num_samples=n,
            samples_per_shard=4,
            num_frames=4,
            height=32,
            width=32,
            controls="",
            seed=seed,
            prefix=split,
            progress=False,
        )
    scripts = Path(sysconfig.get_path("scripts"))  # console scripts are Python files
    script = scripts / "vidistill"
    cmd = [
        sys.executable,
        str(scripts / "fabric"),
        "run",
        "--accelerator",
        "cpu",
        "--devices",
        "2",
        str(script),
        "fit",
        "--config",
        "recipes/quickstart/base.yaml",
        f"--data.init_args.train_shards={tmp_path / 'train'}",
        f"--data.init_args.val_shards={tmp_path / 'val'}",
        "--data.init_args.batch_size=2",
        "--data.init_args.num_frames=4",
        "--data.init_args.height=32",
        "--data.init_args.width=32",
        "--data.init_args.num_workers=0",
        "--trainer.devices=2",
        "--trainer.max_steps=2",
        "--trainer.limit_val_batches=0",
        f"--trainer.default_root_dir={tmp_path / 'run'}",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'run'}",
        "--trainer.enable_progress_bar=false",
        f"--model.init_args.options.export_to={tmp_path / 'export'}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in log
    assert "max_steps=2` reached" in log
    assert (tmp_path / "export" / "model.safetensors").is_file()
