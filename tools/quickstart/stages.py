"""The quickstart's budgets and stages, each a `vidistill` subcommand called in-process."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from .report import write_report
from .runs import DATA, EVAL, OUTPUTS, RUNS, RUNS_TO_COMPARE, SPECS

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "quickstart"
# the recipes' clip size
CLIP = ["--num_frames", 4, "--height", 32, "--width", 48]
# plain black floors: the shapes' outlines are the only edges and every shape colour stands out
# in gray levels (Canny misses a blue or purple shape on gray); shapes 1.8x the default size, so
# even a small one spans several 4x4-pixel tokens
SCENE = ["--floors", "plain", "--floor_colours", "black", "--shape_scale", 1.8]


@dataclass
class Budget:
    """How much each stage does. `full` is the quickstart; `smoke` checks the plumbing (CI)."""

    train_clips: int = 256
    val_clips: int = 16
    base_steps: int = 190
    control_steps: int = 140
    blur_steps: int = 30
    kd_clips: int = 32
    kd_val_clips: int = 8
    kd_steps: int = 50
    dmd2_turns: int = 20
    val_samples: int = 4
    """Held-out clips each training stage validates on (loss, sample videos, Edge F1) at its end."""
    specs: int = 8


SMOKE = Budget(
    train_clips=16,
    val_clips=4,
    base_steps=2,
    control_steps=2,
    blur_steps=2,
    kd_clips=8,
    kd_val_clips=2,
    kd_steps=2,
    dmd2_turns=6,
    specs=2,
    val_samples=2,
)
BUDGETS = {
    "cpu": {"full": Budget(), "smoke": SMOKE},
    # one GPU: the CPU run's clips and networks with about 15x the steps and 8x the clips, what the
    # tiny networks need to draw the shapes (measured on an H200: 200 base + 200 edge steps give
    # scattered blocks, 1000 + 500 shapes in patches, 3000 + 1500 whole shapes that follow the edges)
    "cuda": {
        "full": Budget(
            train_clips=2048,
            val_clips=16,
            base_steps=3000,
            control_steps=1500,
            blur_steps=500,
            kd_clips=512,
            kd_val_clips=16,
            kd_steps=600,
            dmd2_turns=400,
            specs=8,
            val_samples=8,
        ),
        "smoke": SMOKE,
    },
}


@contextmanager
def inside(path: Path):
    """Run with `path` as the working directory (the recipes' runs/quickstart/... land under OUT),
    and leave the caller's process as it was: the in-process Lightning runs set MASTER_PORT and
    friends and keep a gloo process group listening on that port, which a later torchrun or
    Lightning launch from the same process (or its children) would collide with."""
    import torch.distributed as dist

    old, env = os.getcwd(), dict(os.environ)
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(env)


def cli(*args) -> None:
    """A `vidistill` subcommand, in-process, exactly as typed in a shell."""
    from tools.cli import main

    main([str(a) for a in args])


def training_config(stage: str, steps: int, device: str, val_samples: int | None = None) -> Path:
    """The recipe with this run's budget: max_steps, the LR schedule's length, when to validate and
    checkpoint. Written next to the runs, for the record."""
    import yaml

    recipe = yaml.safe_load((RECIPES / f"{stage}.yaml").read_text())
    trainer, model = recipe["trainer"], recipe["model"]["init_args"]
    trainer["max_steps"] = trainer["val_check_interval"] = steps
    # enough points for the report's loss curves even on a short budget
    trainer["log_every_n_steps"] = max(1, min(trainer.get("log_every_n_steps", 50), steps // 25))
    if device == "cuda":
        trainer["accelerator"] = "gpu"
    if val_samples is not None:
        recipe["data"]["init_args"]["val_samples"] = val_samples
    for cb in trainer.get("callbacks", []):
        if cb["class_path"].endswith(("ModelCheckpoint", "AtomicCheckpoint")):
            # the recipe's periodic checkpoints (a rerun resumes from the latest; "last" is saved
            # at the end too), at least one per stage
            every = cb["init_args"].get("every_n_train_steps") or steps
            cb["init_args"]["every_n_train_steps"] = min(every, steps)
    if "optim" in model:
        model["optim"]["total_steps"] = steps
    for key in ("optim", "student_optim", "critic_optim"):  # warm-up: at most a tenth of the budget
        if key in model:
            model[key]["warmup_steps"] = min(model[key].get("warmup_steps", 0), max(steps // 10, 1))
    path = Path("configs") / f"{stage}.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(
        f"# recipes/quickstart/{stage}.yaml with the quickstart budget ({steps} steps)\n"
        + yaml.safe_dump(recipe, sort_keys=False)
    )
    return path


def fit(stage: str, steps: int, device: str, val_samples: int | None = None) -> None:
    """`vidistill fit` of a quickstart recipe; an interrupted stage resumes from its latest
    complete checkpoint (`--ckpt_path last`: the recipes save one every 50 steps)."""
    config = training_config(stage, steps, device, val_samples)
    resume = (RUNS / stage / "checkpoints").is_dir()
    cli("fit", "--config", config, *(["--ckpt_path", "last"] if resume else []))


# --------------------------------------------------------------------------------------------
# The stages that are no training run
# --------------------------------------------------------------------------------------------


def make_data(b: Budget) -> None:
    """Synthetic train and held-out val shards at the recipes' clip size (no stored controls: the
    datamodule computes them)."""
    size = [*CLIP, "--controls", "", *SCENE, "--progress", "false"]
    cli("make-shards", "--synthetic", "video", "--out", DATA / "train", "--num_samples", b.train_clips, *size)
    cli(
        "make-shards",
        "--synthetic",
        "video",
        "--out",
        DATA / "val",
        "--num_samples",
        b.val_clips,
        "--seed",
        1,
        "--prefix",
        "val",
        *size,
    )


def make_kd_data(b: Budget) -> None:
    """The teacher's trajectories on train clips (the recipe's output) and on the val clips."""
    recipe = RECIPES / "kd_data.yaml"
    cli("make-kd-data", "--config", recipe, "--num_samples", b.kd_clips)
    cli(
        "make-kd-data",
        "--config",
        recipe,
        "--shards",
        DATA / "val",
        "--out",
        RUNS / "kd/val",
        "--num_samples",
        b.kd_val_clips,
    )


def consolidate() -> None:
    cli("consolidate", RUNS / "dmd2/checkpoints/last.ckpt", "--out", RUNS / "dmd2/consolidated")


def combine() -> None:
    """The edge + vis teacher: the base with both control branches."""
    controls = json.dumps([str(RUNS / "edge/export"), str(RUNS / "blur/export")])
    cli("combine", RUNS / "base/export", "--control", controls, "--out", RUNS / "teacher_edge_vis")


def make_specs(b: Budget) -> None:
    """Held-out specs over the val clips: one file with the edge control, one with edge + vis."""
    for controls, file in (("edge", "edge.jsonl"), ("edge,vis", "edge_vis.jsonl")):
        cli(
            "make-specs",
            DATA / "val",
            "--out",
            SPECS,
            "--controls",
            controls,
            "--num",
            b.specs,
            "--file",
            file,
            "--num_steps",
            35,
            "--guidance",
            0,
        )


def infer_all(specs: Path, out_dir: Path, device: str) -> None:
    """Every compared model over the held-out specs (lossless copies for exact scoring)."""
    for folder, _, model, extra in RUNS_TO_COMPARE:
        args = [a if a not in ("edge.jsonl", "edge_vis.jsonl") else specs / a for a in extra]
        cli(
            "infer",
            *args,
            "-o",
            out_dir / folder,
            "--model",
            model,
            "--lossless",
            "--device",
            "cuda" if device == "cuda" else "cpu",
        )


def evaluate() -> None:
    labels = json.dumps([label for _, label, _, _ in RUNS_TO_COMPARE])
    cli("evaluate", *(OUTPUTS / r for r, _, _, _ in RUNS_TO_COMPARE), "--labels", labels, "--out", EVAL)


def stages(b: Budget, device: str) -> list[tuple[str, Callable[[], object], Path | None]]:
    """(name, run, artifact) in order; a stage whose artifact exists is done already."""
    return [
        ("data", lambda: make_data(b), None),
        ("base", lambda: fit("base", b.base_steps, device, b.val_samples), RUNS / "base/export"),
        ("edge", lambda: fit("edge", b.control_steps, device, b.val_samples), RUNS / "edge/export"),
        ("blur", lambda: fit("blur", b.blur_steps, device, b.val_samples), RUNS / "blur/export"),
        ("kd_data", lambda: make_kd_data(b), None),
        ("kd", lambda: fit("kd", b.kd_steps, device, b.val_samples), RUNS / "kd/export"),
        ("dmd2", lambda: fit("dmd2", b.dmd2_turns, device, b.val_samples), RUNS / "dmd2/export"),
        ("consolidate", consolidate, RUNS / "dmd2/consolidated/student"),
        ("combine", combine, RUNS / "teacher_edge_vis/model.safetensors"),
        ("specs", lambda: make_specs(b), None),
        ("infer", lambda: infer_all(SPECS, OUTPUTS, device), None),
        ("evaluate", evaluate, None),
    ]


def quickstart(*, out: str = "quickstart", device: str = "cpu", budget: str = "full") -> Path:
    """Run the whole pipeline on the embedded default and write OUT/report.html.

    Args:
        out: output directory; everything goes under it. Rerunning skips finished stages.
        device: cpu or cuda (one GPU, the same tiny networks).
        budget: full (the quickstart) or smoke (a few steps per stage, to check the plumbing).
    """
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {device!r}")
    if device == "cuda":  # before any data is made
        import torch

        if not torch.cuda.is_available():
            raise ValueError(
                "--device cuda: this machine has no CUDA device (torch.cuda.is_available() is False); "
                "run with --device cpu"
            )
    if budget not in BUDGETS[device]:
        raise ValueError(f"budget must be one of {', '.join(BUDGETS[device])}, got {budget!r}")
    if not RECIPES.is_dir():
        raise FileNotFoundError(f"{RECIPES} not found: quickstart runs from a source checkout (pip install -e .)")
    b = BUDGETS[device][budget]
    root = Path(out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    state_file = root / "quickstart.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {"stages": {}}
    state.update(budget=asdict(b), device=device, machine=f"{platform.machine()}, {os.cpu_count()} cores")
    with inside(root):
        for name, run, artifact in stages(b, device):
            if artifact is not None and Path(artifact).exists():
                print(f"[quickstart] {name}: done already ({artifact})", flush=True)
                continue
            print(f"[quickstart] {name} ...", flush=True)
            t0 = time.perf_counter()
            run()
            state["stages"][name] = round(time.perf_counter() - t0, 1)
            state_file.write_text(json.dumps(state, indent=2))
        report = write_report(root)
    total = sum(state["stages"].values())
    print(f"[quickstart] report: {report} (stages run this time: {total / 60:.1f} min)", flush=True)
    return report
