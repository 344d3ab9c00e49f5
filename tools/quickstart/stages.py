"""The quickstart's budgets and stages, each a `vidistill` subcommand (training runs in a child process)."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from .guard import owned, run_child
from .report import write_report
from .runs import DATA, EVAL, OUTPUTS, RUNS, RUNS_TO_COMPARE, SHIPPED, SPARSE_SOURCE, SPEC_FILES, SPECS

ROOT = Path(__file__).resolve().parents[2]  # the checkout (a training stage's child process imports it)
RECIPES = ROOT / "recipes" / "quickstart"
# the recipes' clip size
CLIP = ["--num_frames", 4, "--height", 32, "--width", 48]
# plain black floors: the shapes' outlines are the only edges and every shape colour stands out
# in gray levels (Canny misses a blue or purple shape on gray); shapes 1.8x the default size, so
# even a small one spans several 4x4-pixel tokens
SCENE = ["--floors", "plain", "--floor_colours", "black", "--shape_scale", 1.8]


@dataclass
class Budget:
    """How much each stage does. `full` is the quickstart; `smoke` checks the plumbing (CI).
    base_steps and control_steps (and train_clips for them) are spent only with --from-scratch:
    otherwise the base and the edge teacher are the shipped ones (modules/weights/)."""

    train_clips: int = 256
    val_clips: int = 32
    base_steps: int = 5000
    control_steps: int = 2500
    blur_steps: int = 30
    kd_clips: int = 32
    kd_val_clips: int = 8
    kd_steps: int = 50
    dmd2_turns: int = 20
    val_samples: int = 4
    """Held-out clips each training stage validates on (loss, sample videos, Edge F1) at its end."""
    specs: int = 32
    """Held-out clips every compared model generates and is scored on (mean and spread): with 16,
    the control-free base's mean shape IoU alone moves by about 0.04 from one set of clips to the
    next, a sixth of its value."""
    pretrain_clips: int = 2048
    """Training clips of --from-scratch's base and edge stages (the shipped weights' data)."""


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
    pretrain_clips=16,
)
BUDGETS = {
    "cpu": {"full": Budget(), "smoke": SMOKE},
    # one GPU: the same networks and shipped teacher, with about 10x the steps and clips for the
    # stages run here (blur branch, KD data, KD warmup, DMD2); --from-scratch trains the base and
    # edge teacher with the shipped budget, which a GPU does in minutes
    "cuda": {
        "full": Budget(
            train_clips=2048,
            val_clips=32,
            blur_steps=500,
            kd_clips=512,
            kd_val_clips=16,
            kd_steps=600,
            dmd2_turns=400,
            specs=32,
            val_samples=8,
        ),
        "smoke": SMOKE,
    },
}


@contextmanager
def inside(path: Path):
    """Run with `path` as the working directory (the recipes' runs/quickstart/... land under OUT),
    and leave the caller's process as it was: a subcommand that starts a process group sets
    MASTER_PORT and friends and keeps a gloo group listening on that port, which a later torchrun
    or Lightning launch from the same process (or its children) would collide with."""
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


class StageFailed(ValueError):
    """A training run exited with an error (printed above by `vidistill fit`); a ValueError, so
    `vidistill quickstart` ends with it in one line."""


def fit_in_child(*args) -> None:
    """`vidistill fit ARGS` in a child process of this interpreter and checkout (its output passes
    through). Not in this process: a checkpoint save runs a gloo collective that runs an OpenMP
    loop on one of gloo's threads, after which libgomp counts more OpenMP threads than cores and
    stops spin-waiting for the rest of the process; every later stage's small CPU ops then ran
    3-10x slower (infer 2.9 s a video instead of 0.9 s after an in-process fit, on 2 cores). The
    other subcommands start no process group and stay in-process (a child costs seconds of
    imports)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "tools.cli", "fit", *map(str, args)]
    code = run_child(command, env)  # killed with this process: no orphan trains beside a rerun
    if code != 0:
        raise StageFailed(f"`vidistill {' '.join(command[3:])}` exited with status {code} (its error is above)")


# stages whose recipe is an overlay on another's (`vidistill fit --config BASE --config OVERLAY`)
OVERLAYS = {"kd_sparse": "kd", "dmd2_sparse": "dmd2"}


def overlaid(base: dict, overlay: dict) -> dict:
    """`overlay`'s keys over `base`'s, mappings merged key by key and anything else (lists
    included) replaced: how LightningCLI applies a second --config."""
    out = dict(base)
    for key, value in overlay.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = overlaid(out[key], value) if both else value
    return out


def recipe_of(stage: str) -> dict:
    """The stage's recipe as `vidistill fit` reads it: an overlay merged over its base recipe."""
    import yaml

    recipe = yaml.safe_load((RECIPES / f"{stage}.yaml").read_text())
    if stage in OVERLAYS:
        recipe = overlaid(yaml.safe_load((RECIPES / f"{OVERLAYS[stage]}.yaml").read_text()), recipe)
    return recipe


def training_config(stage: str, steps: int, device: str, val_samples: int | None = None, seed: int = 0) -> Path:
    """The recipe with this run's budget and seed: max_steps, the LR schedule's length, when to
    validate and checkpoint, the seed of every draw. Written next to the runs, for the record."""
    import yaml

    recipe = recipe_of(stage)
    trainer, model = recipe["trainer"], recipe["model"]["init_args"]
    recipe["seed_everything"] = seed
    model.setdefault("options", {})["seed"] = seed
    trainer["max_steps"] = trainer["val_check_interval"] = steps
    # enough points for the report's loss curves even on a short budget
    trainer["log_every_n_steps"] = max(1, min(trainer.get("log_every_n_steps", 50), steps // 25))
    if device == "cuda":
        trainer["accelerator"] = "gpu"
    if val_samples is not None:
        recipe["data"]["init_args"]["val_samples"] = val_samples
    for cb in trainer.get("callbacks", []):
        if cb["class_path"].endswith(("ModelCheckpoint", "AtomicCheckpoint")):
            # the recipe's periodic checkpoints (every 50 steps), and at least two per stage, so
            # a stage killed after its first save resumes from it ("last" is saved at the end too)
            every = cb["init_args"].get("every_n_train_steps") or steps
            cb["init_args"]["every_n_train_steps"] = max(1, min(every, steps // 2))
    if "optim" in model:
        model["optim"]["total_steps"] = steps
    for key in ("optim", "student_optim", "critic_optim"):  # warm-up: at most a tenth of the budget
        if key in model:
            model[key]["warmup_steps"] = min(model[key].get("warmup_steps", 0), max(steps // 10, 1))
    path = Path("configs") / f"{stage}.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(
        f"# recipes/quickstart/{stage}.yaml"
        + (f" over {OVERLAYS[stage]}.yaml" if stage in OVERLAYS else "")
        + f" with the quickstart budget ({steps} steps)\n"
        + yaml.safe_dump(recipe, sort_keys=False)
    )
    return path


def fit(stage: str, steps: int, device: str, val_samples: int | None = None, seed: int = 0) -> None:
    """`vidistill fit` of a quickstart recipe; an interrupted stage resumes from its latest
    complete checkpoint (`--ckpt_path last`: every 50 steps and at least twice per stage)."""
    config = training_config(stage, steps, device, val_samples, seed)
    resume = (RUNS / stage / "checkpoints").is_dir()
    fit_in_child("--config", config, *(["--ckpt_path", "last"] if resume else []))


# --------------------------------------------------------------------------------------------
# The stages that are no training run
# --------------------------------------------------------------------------------------------


def make_data(b: Budget, seed: int, from_scratch: bool) -> None:
    """Synthetic train and held-out val shards at the recipes' clip size (no stored controls: the
    datamodule computes them; shape masks for evaluation). Val clips come from seed + 1, so they
    are never among the training clips (nor among the shipped weights' training clips, seed 0)."""
    size = [*CLIP, "--controls", "", *SCENE, "--progress", "false"]
    clips = b.pretrain_clips if from_scratch else b.train_clips
    cli("make-shards", "--synthetic", "video", "--out", DATA / "train", "--num_samples", clips, "--seed", seed, *size)
    val = ["--num_samples", b.val_clips, "--seed", seed + 1, "--prefix", "val"]
    cli("make-shards", "--synthetic", "video", "--out", DATA / "val", *val, *size)


def install_shipped() -> None:
    """The shipped edge teacher (checked against its recorded hashes) where the edge stage would
    have exported it, and its base, split off it, where the base stage would have."""
    import shutil

    from modules.combine import split
    from modules.pretrained import shipped

    teacher = shipped(SHIPPED["edge"])
    for stage in ("base", "edge"):
        shutil.rmtree(RUNS / stage / "export", ignore_errors=True)
    shutil.copytree(teacher, RUNS / "edge/export", ignore=shutil.ignore_patterns("RECORD.json"))
    parts = RUNS / "shipped_parts"
    split(str(teacher), parts)
    shutil.move(parts / "base", RUNS / "base/export")
    shutil.rmtree(parts)


def make_kd_data(b: Budget, seed: int) -> None:
    """The teacher's trajectories on train clips (the recipe's output) and on the val clips."""
    recipe = RECIPES / "kd_data.yaml"
    cli("make-kd-data", "--config", recipe, "--num_samples", b.kd_clips, "--seed", seed)
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
        "--seed",
        seed,
    )


def consolidate(stage: str) -> None:
    cli("consolidate", RUNS / stage / "checkpoints/last.ckpt", "--out", RUNS / stage / "consolidated")


def combine() -> None:
    """The edge + vis teacher: the base with both control branches."""
    controls = json.dumps([str(RUNS / "edge/export"), str(RUNS / "blur/export")])
    cli("combine", RUNS / "base/export", "--control", controls, "--out", RUNS / "teacher_edge_vis")


def make_specs(b: Budget, seed: int) -> None:
    """Held-out specs over the val clips (SPEC_FILES: edge, edge at weight 0, edge + vis), their
    sampling seeds from `seed`."""
    for file, controls, weight in SPEC_FILES:
        args = ["--controls", controls, "--control_weight", weight, "--num", b.specs, "--file", file]
        cli("make-specs", DATA / "val", "--out", SPECS, *args, "--num_steps", 35, "--guidance", 0, "--seed", seed)


def infer_all(device: str) -> None:
    """Every compared model over the held-out specs (lossless copies for exact scoring)."""
    for folder, _, model, specs, extra in RUNS_TO_COMPARE:
        where = ["-o", OUTPUTS / folder, "--model", model, "--lossless", "--device", device]
        cli("infer", "--input", SPECS / specs, *extra, *where)


def sources(state: dict) -> list[str]:
    """Where each compared model came from, for metrics.json and the report."""
    trained = state["trained"]

    def made(stage: str) -> str:
        if stage in trained:
            return f"trained in this run: {trained[stage]} steps"
        return f"shipped (modules/weights/{SHIPPED['edge']})"

    teacher = made("edge")
    return [
        f"the teacher with its edge branch at weight 0: base {made('base')}",
        teacher,
        f"KD warmup from the teacher ({teacher}), {made('kd')}",
        f"DMD2 from the KD student, {made('dmd2')}",
        f"DMD2 from the KD student, {made('dmd2')}, sampled with 1 step",
        f"base and edge teacher ({teacher}) + blur branch {made('blur')}",
        f"sparse attention ({SPARSE_SOURCE}): KD warmup from the teacher, {made('kd_sparse')}; "
        f"DMD2 from it, {made('dmd2_sparse')}",
    ]


def evaluate(state: dict) -> None:
    labels = json.dumps([label for _, label, _, _, _ in RUNS_TO_COMPARE])
    runs = [OUTPUTS / folder for folder, _, _, _, _ in RUNS_TO_COMPARE]
    where = ["--reference", SPECS / "videos", "--out", EVAL]
    cli("evaluate", *runs, "--labels", labels, "--sources", json.dumps(sources(state)), *where)


def stages(b: Budget, device: str, seed: int, from_scratch: bool, state: dict):
    """(name, run, artifact) in order; a stage whose artifact exists is done already."""
    trained = state.setdefault("trained", {})

    def train(stage: str, steps: int):
        def run() -> None:
            fit(stage, steps, device, b.val_samples, seed)
            trained[stage] = steps

        return stage, run, RUNS / stage / "export"

    teacher = [train("base", b.base_steps), train("edge", b.control_steps)] if from_scratch else []
    return [
        ("data", lambda: make_data(b, seed, from_scratch), None),
        *(teacher or [("shipped", install_shipped, RUNS / "edge/export")]),
        train("blur", b.blur_steps),
        ("kd_data", lambda: make_kd_data(b, seed), None),
        train("kd", b.kd_steps),
        train("dmd2", b.dmd2_turns),
        ("consolidate", lambda: consolidate("dmd2"), RUNS / "dmd2/consolidated/student"),
        train("kd_sparse", b.kd_steps),
        train("dmd2_sparse", b.dmd2_turns),
        ("consolidate_sparse", lambda: consolidate("dmd2_sparse"), RUNS / "dmd2_sparse/consolidated/student"),
        ("combine", combine, RUNS / "teacher_edge_vis/model.safetensors"),
        ("specs", lambda: make_specs(b, seed), None),
        ("infer", lambda: infer_all(device), None),
        ("evaluate", lambda: evaluate(state), None),
    ]


def quickstart(
    *, out: str = "quickstart", device: str = "cpu", budget: str = "full", seed: int = 0, from_scratch: bool = False
) -> Path:
    """Run the whole pipeline on the embedded default and write OUT/report.html.

    Args:
        out: output directory; everything goes under it. Rerunning skips finished stages.
        device: cpu or cuda (one GPU, the same tiny networks).
        budget: full (the quickstart) or smoke (a few steps per stage, to check the plumbing).
        seed: the seed of everything the run draws: data, training, KD noise and sampling.
        from_scratch: train the base and the edge teacher here with the recipes and budget the
            shipped ones were made with (modules/weights/*/RECORD.json) instead of using them.

    Returns the path of report.html.
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
    state.update(seed=seed, from_scratch=from_scratch)
    with owned(root), inside(root):  # one quickstart per OUT
        for name, run, artifact in stages(b, device, seed, from_scratch, state):
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
