"""`vidistill bench --mode scale`: data and context parallelism against one GPU, in one torchrun.

    torchrun --nproc_per_node 2 -m tools.cli bench --mode scale --preset 2b --checkpointing attention

Every ratio compares two numbers of one process group: first rank 0 measures alone (the other
ranks wait at a barrier), then all ranks together. What is measured, with the stages' own code:

- control: a ControlTraining step (the stage's `loss`, backward, global-norm clip 1.0, AdamW) of
  the 2b edge control recipe's set-up (base frozen, control branch trained, `checkpointing` as
  the recipe) with FSDP2 as `fit` shards it (fp32 parameters, bf16 compute, fp32 reduction):
  one GPU (a one-rank mesh, as `fit --trainer.devices 1` runs) against data parallelism over
  all ranks at the same per-GPU batch (one sample; each rank its own). Efficiency = one-GPU step
  time / the all-rank step time (throughput per GPU kept).
- cp_train: the same step with one sample split over `context_parallel` ranks (the same FSDP2
  network with context parallelism switched on): step time / the one-GPU step time.
- cp_infer: inference per step, as `vidistill infer` computes it: an unsharded bf16 Denoiser
  under autocast sampling the 4-step student t-list (Sampler.sample), time / 4, one GPU against
  the sequence split over `context_parallel` ranks.
- dmd2: the student and critic turns of tools/bench/dmd2_stage.py (the DMD2 stage's own
  turn_loss at the full backward simulation), FSDP2-sharded as `fit` shards them, one GPU against
  all ranks (each rank its own sample).

Reported times are the slowest rank's (all_reduce MAX of each rank's median).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import platform
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from modules.denoiser import Cond, Denoiser
from modules.nets import NetConfig
from modules.nets import preset as net_preset
from modules.nets.dit import checkpoint_plan
from modules.parallel import ShardingConfig, context_group, context_mesh
from modules.sampling import Sampler, SamplerConfig
from modules.stages.base import NetSpec, OptimSpec, StageOptions, TextSpec, TokenizerSpec
from modules.stages.control_training import ControlTraining, TimeSpec
from tools.bench.common import (
    Grid,
    Options,
    free,
    make_inputs,
    parse_shapes,
    peak_gib,
    profile_table,
    stage_batch,
    timed_peak,
)
from tools.bench.dmd2_stage import Turns

PARTS = ("control", "cp_train", "cp_infer", "dmd2")
TURNS = (("student turn", True), ("critic turn", False))


class _Control(ControlTraining):
    """The control stage materialised on `bench_device` without a Trainer."""

    bench_device: torch.device = torch.device("cpu")

    def build_device(self) -> torch.device:
        return self.bench_device


def control_stage(preset: str, device: torch.device, checkpointing: str, compile: bool, mesh, param_dtype: str):
    """ControlTraining as the 2b edge control recipe sets it up (tokenizer and text precomputed)."""
    stage = _Control(
        net=NetSpec(preset=preset, overrides={"text_proj_in": None}),
        modality="edge",
        time=TimeSpec(shift=5.0),
        max_cond_frames=2,
        optim=OptimSpec(lr=1e-4, warmup_steps=1),
        options=StageOptions(
            tokenizer=TokenizerSpec(kind="none"),
            text=TextSpec(encoder="none", dropout=0.0),
            sharding=ShardingConfig(param_dtype=param_dtype, checkpointing=checkpointing, compile=compile),
        ),
    )
    stage.bench_device = device
    stage._device_mesh = mesh
    stage.configure_model()
    opt = stage.configure_optimizers()["optimizer"]
    return stage, opt


def control_batch(cfg, grid: Grid, device, seed: int) -> dict:
    """One sample's precomputed latents, control latents and text embeddings (float32, as loaded)."""
    return {**stage_batch(cfg, grid, device, torch.float32, seed), "fps": torch.tensor([16.0])}


def control_step(stage, opt, b: dict) -> None:
    """What the Trainer does with ControlTraining.training_step: loss, backward, clip, AdamW."""
    loss = stage.loss(b, step=0)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in stage.model.parameters() if p.requires_grad], 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def slowest(seconds: float, device: torch.device) -> float:
    """The largest of every rank's time (the step of a collective group ends with its slowest rank)."""
    t = torch.tensor([seconds], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def from_rank0(value):
    """Rank 0's `value` on every rank, once rank 0 has measured alone (the others wait here)."""
    dist.barrier()
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def solo_mesh(device_type: str):
    """A one-rank mesh of rank 0 (every rank must call it; the others get None)."""
    group = dist.new_group([0])
    return (
        DeviceMesh.from_group(group, device_type, mesh_dim_names=("data_parallel",)) if dist.get_rank() == 0 else None
    )


def join_group(device: str, context_parallel: int) -> tuple[int, int, torch.device]:
    """(rank, world, this rank's device), the process group started if torchrun has not."""
    cuda = device.startswith("cuda")
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=30))
    rank, world = dist.get_rank(), dist.get_world_size()
    if world < 2 or world % context_parallel:
        raise ValueError(
            f"--mode scale needs torchrun with >= 2 processes and context_parallel dividing them "
            f"(world {world}, context_parallel {context_parallel})"
        )
    return rank, world, torch.device(f"cuda:{torch.cuda.current_device()}") if cuda else torch.device("cpu")


@dataclasses.dataclass
class Group:
    """This process's place in the torchrun group, its meshes, and the rows that rank 0 prints."""

    rank: int
    world: int
    context_parallel: int
    device: torch.device
    solo: DeviceMesh | None
    """Rank 0 alone (None on the other ranks)."""
    data: DeviceMesh
    """Every rank its own sample: (data world, context 1)."""
    context: DeviceMesh
    """One sample split over each `context_parallel` ranks."""
    rows: list[dict] = dataclasses.field(default_factory=list)

    @classmethod
    def join(cls, device: str, context_parallel: int) -> Group:
        rank, world, dev = join_group(device, context_parallel)
        solo = solo_mesh(dev.type)
        data = context_mesh(dev.type, world, 1)
        context = context_mesh(dev.type, world // context_parallel, context_parallel)
        return cls(rank, world, context_parallel, dev, solo, data, context)

    def say(self, text: str) -> None:
        if self.rank == 0:
            print(text, flush=True)

    def add(self, part, shape, gpus, layout, seconds, peak, samples: int | None, ratio: float, entry=None) -> None:
        """One row: `seconds` per step, `samples` per step (None: no throughput), `ratio` against one GPU."""
        row = dict(part=part, **({"entry": entry} if entry else {}), shape=shape, gpus=gpus, layout=layout)
        row.update(
            seconds=round(seconds, 3),
            peak_GiB=peak and round(peak, 1),
            samples_per_s=round(samples / seconds, 4) if samples else None,
            ratio=round(ratio, 3),
        )
        self.rows.append(row)
        self.say(json.dumps(row))


def bench_scale(
    opts: Options,
    dmd2_shapes: str = "480p_93f",
    dmd2_checkpointing: str = "full",
    parts: str = ",".join(PARTS),
    context_parallel: int = 2,
) -> list[dict]:
    """Run under torchrun (every rank runs this); rank 0 prints JSON rows and the tables.
    `opts.shapes` are the control, cp_train and cp_infer parts', `dmd2_shapes` the DMD2 turns'."""
    wanted = [p.strip() for p in parts.split(",") if p.strip()]
    if set(wanted) - set(PARTS):
        raise ValueError(f"scale parts must be among {', '.join(PARTS)}, got {parts!r}")
    checkpoint_plan(opts.checkpointing, 1)
    checkpoint_plan(dmd2_checkpointing, 1)
    dt = opts.torch_dtype
    g = Group.join(opts.device, context_parallel)
    g.say(json.dumps(scale_header(opts, g, dmd2_checkpointing)))
    cfg = net_preset(opts.preset, text_proj_in=None)
    if {"control", "cp_train"} & set(wanted):
        control_parts(opts, g, cfg, wanted)
    if "cp_infer" in wanted:
        cp_infer_part(opts, g, cfg, dt)
    if "dmd2" in wanted:
        dmd2_part(opts, g, cfg, dt, dmd2_shapes, dmd2_checkpointing)
    g.say(format_tables(g.rows))
    dist.barrier()
    return g.rows


def scale_header(opts: Options, g: Group, dmd2_checkpointing: str) -> dict:
    cuda = g.device.type == "cuda"
    return dict(
        command="vidistill " + " ".join(sys.argv[1:]),
        mode="scale",
        world=g.world,
        context_parallel=g.context_parallel,
        torch=torch.__version__,
        python=platform.python_version(),
        device=torch.cuda.get_device_name(g.device) if cuda else "cpu",
        nccl=".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
        preset=opts.preset,
        checkpointing=opts.checkpointing,
        dmd2_checkpointing=dmd2_checkpointing,
        compile=opts.compile,
    )


def control_parts(opts: Options, g: Group, cfg: NetConfig, wanted: list[str]) -> None:
    """The control step on one GPU, then on all ranks: data parallel ("control") and one sample
    split over context-parallel ranks ("cp_train"), one FSDP2 network re-meshed between them."""
    grids = parse_shapes(opts.shapes)
    one = from_rank0(control_one_gpu(opts, g, cfg, grids) if g.rank == 0 else None)
    stage, opt = control_stage(opts.preset, g.device, opts.checkpointing, opts.compile, g.data, opts.dtype)
    for shape, grid in grids.items():
        if "control" in wanted:
            data_parallel_step(opts, g, cfg, stage, opt, shape, grid, one[shape])
        if "cp_train" in wanted:
            context_parallel_step(opts, g, cfg, stage, opt, shape, grid, one[shape])
    del stage, opt
    free(g.device)


def control_one_gpu(opts: Options, g: Group, cfg: NetConfig, grids: dict[str, Grid]) -> dict[str, float]:
    """Rank 0 alone on its one-rank mesh: the control step's seconds per shape."""
    stage, opt = control_stage(opts.preset, g.device, opts.checkpointing, opts.compile, g.solo, opts.dtype)
    one = {}
    for shape, grid in grids.items():
        b = control_batch(cfg, grid, g.device, seed=0)
        one[shape], mem = timed_peak(functools.partial(control_step, stage, opt, b), opts.steps, g.device)
        g.add("control", shape, 1, "1 GPU", one[shape], mem, samples=1, ratio=1.0)
    del stage, opt
    free(g.device)
    return one


def measure_all_ranks(fn: Callable[[], None], steps: int, g: Group) -> tuple[float, float | None]:
    """The slowest rank's median seconds of fn, and this rank's peak GiB."""
    t, mem = timed_peak(fn, steps, g.device)
    return slowest(t, g.device), mem


def data_parallel_step(opts: Options, g: Group, cfg: NetConfig, stage, opt, shape: str, grid: Grid, one: float):
    """The control step with every rank its own sample: efficiency = throughput per GPU against one GPU."""
    stage._device_mesh = g.data  # data rank = rank: each rank its own sample and draws
    step = functools.partial(control_step, stage, opt, control_batch(cfg, grid, g.device, seed=g.rank))
    t, mem = measure_all_ranks(step, opts.steps, g)
    g.add("control", shape, g.world, f"FSDP2 data x{g.world}", t, mem, samples=g.world, ratio=one / t)


def context_parallel_step(opts: Options, g: Group, cfg: NetConfig, stage, opt, shape: str, grid: Grid, one: float):
    """The control step with one sample split over each context-parallel group: time against one GPU."""
    stage._device_mesh = g.context  # one context group shares its sample and draws
    stage.model.set_context_parallel(context_group(g.context))
    step = functools.partial(control_step, stage, opt, control_batch(cfg, grid, g.device, seed=0))
    t, mem = measure_all_ranks(step, opts.steps, g)
    layout = f"FSDP2 data x{g.world // g.context_parallel} x context {g.context_parallel}"
    g.add("cp_train", shape, g.world, layout, t, mem, samples=g.world // g.context_parallel, ratio=t / one)
    if opts.profile:
        write_profile(step, g.device, opts.profile, f"cp_train_{shape}", g.rank)
    stage.model.set_context_parallel(None)


@torch.no_grad()
def sample_once(sampler: Sampler, config: SamplerConfig, cond: Cond, noise: torch.Tensor, dt: torch.dtype) -> None:
    """One sampling run as `vidistill infer` runs it: bf16 autocast, the same seed every time."""
    g = torch.Generator(device=noise.device).manual_seed(0)
    with torch.autocast(noise.device.type, dt, enabled=dt != torch.float32):
        sampler.sample(cond, noise, config, generator=g)


def cp_infer_part(opts: Options, g: Group, cfg: NetConfig, dt: torch.dtype) -> None:
    """Inference per step of the 4-step student t-list: one GPU against the sequence split over
    context-parallel ranks."""
    model = Denoiser.build(cfg, device=g.device, dtype=dt).eval()
    sampler = Sampler(model)
    config = SamplerConfig(sampler="student", t_list=(1.0, 0.75, 0.5, 0.25), shift=5.0)
    per_step = len(config.t_list)
    for shape, grid in parse_shapes(opts.shapes).items():
        x = make_inputs(cfg, grid, g.device, torch.float32, 0)
        cond = Cond(text=x["text"], controls={"edge": x["ctrl"]}, fps=16.0)
        sample = functools.partial(sample_once, sampler, config, cond, x["x"], dt)
        t1 = None
        if g.rank == 0:
            t1, mem = timed_peak(sample, opts.steps, g.device)
            g.add("cp_infer", shape, 1, "1 GPU", t1 / per_step, mem, samples=None, ratio=1.0)
        t1 = from_rank0(t1)
        model.set_context_parallel(context_group(g.context))
        t, mem = measure_all_ranks(sample, opts.steps, g)
        model.set_context_parallel(None)
        layout = f"context {g.context_parallel}"
        g.add("cp_infer", shape, g.world, layout, t / per_step, mem, samples=None, ratio=t / t1)
    del model, sampler
    free(g.device)


def dmd2_part(opts: Options, g: Group, cfg: NetConfig, dt: torch.dtype, shapes: str, checkpointing: str) -> None:
    """DMD2 student and critic turns, FSDP2 on one GPU against all ranks (each rank its own sample)."""
    one = from_rank0(dmd2_turns(opts, g, cfg, dt, shapes, checkpointing, g.solo, 0) if g.rank == 0 else None)
    for (shape, entry), (t, mem) in one.items():
        g.add("dmd2", shape, 1, "1 GPU", t, mem, samples=1, ratio=1.0, entry=entry)
    many = dmd2_turns(opts, g, cfg, dt, shapes, checkpointing, g.data, g.rank)
    for (shape, entry), (t, mem) in many.items():
        t = slowest(t, g.device)
        layout = f"FSDP2 data x{g.world}"
        g.add("dmd2", shape, g.world, layout, t, mem, samples=g.world, ratio=one[shape, entry][0] / t, entry=entry)


def dmd2_turns(
    opts: Options, g: Group, cfg: NetConfig, dt: torch.dtype, shapes: str, checkpointing: str, mesh, seed: int
) -> dict[tuple[str, str], tuple[float, float | None]]:
    """{(shape, entry): (this rank's median seconds, peak GiB)} of the stage sharded over `mesh`;
    out of memory: NaN seconds."""
    turns = Turns.build(opts.preset, g.device, dt, checkpointing, opts.compile, "all", mesh=mesh)
    out = {}
    for shape, grid in parse_shapes(shapes).items():
        b = stage_batch(cfg, grid, g.device, torch.float32, seed)
        for entry, student in TURNS:
            try:
                out[shape, entry] = turns.measure(b, student, opts.steps, g.device)
            except torch.OutOfMemoryError:
                out[shape, entry] = (float("nan"), peak_gib(g.device))
    del turns
    free(g.device)
    return out


def write_profile(step, dev: torch.device, folder: str, name: str, rank: int, top: int = 25) -> None:
    """One more step under torch.profiler on every rank; rank 0 writes its top kernels by device time."""
    table = profile_table(step, dev, top)
    if rank == 0:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / f"{name}.txt").write_text(table)
        print(f"# profile of one {name} step (rank 0)\n{table}", flush=True)


def format_tables(rows: list[dict]) -> str:
    """Markdown: per part, one-GPU and all-rank rows with ratio (control, dmd2: efficiency =
    per-GPU throughput against one GPU; cp_train, cp_infer: time against one GPU)."""
    lines = [
        "| part | entry | shape | GPUs | layout | s (per step) | peak GiB | samples/s | ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['part']} | {r.get('entry', 'step')} | {r['shape']} | {r['gpus']} | {r['layout']} | "
            f"{r['seconds']} | {r['peak_GiB']} | {r['samples_per_s']} | {r['ratio']} |"
        )
    lines.append("")
    goals = {
        "control": ("efficiency", ">=", 0.92),
        "dmd2": ("efficiency", ">=", 0.92),
        "cp_train": ("time ratio", "<=", 0.55),
        "cp_infer": ("time ratio", "<=", 0.55),
    }
    for r in rows:
        if r["gpus"] == 1:
            continue
        what, op, goal = goals[r["part"]]
        met = r["ratio"] >= goal if op == ">=" else r["ratio"] <= goal
        lines.append(
            f"{r['part']} {r.get('entry', 'step')} {r['shape']}: {what} {r['ratio']} "
            f"(target {op} {goal}: {'met' if met else 'missed'})"
        )
    return "\n".join(lines)
