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
- dmd2: the student and critic turns of tools/bench_dmd2.py (the DMD2 stage's own turn_loss at
  the full backward simulation), FSDP2-sharded as `fit` shards them, one GPU against all ranks
  (each rank its own sample).

Reported times are the slowest rank's (all_reduce MAX of each rank's median).
"""

from __future__ import annotations

import json
import os
import platform
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from modules.denoiser import Cond, Denoiser
from modules.nets import preset as net_preset
from modules.nets.dit import checkpoint_plan
from modules.parallel import ShardingConfig, context_group, context_mesh
from modules.sampling import Sampler, SamplerConfig
from modules.stages.base import NetSpec, OptimSpec, TextSpec, TokenizerSpec
from modules.stages.control_training import ControlTraining, TimeSpec
from tools.bench import TEXT_TOKENS, free, make_inputs, parse_shape, peak_gib, reset_peak, timed

PARTS = ("control", "cp_train", "cp_infer", "dmd2")


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
        tokenizer=TokenizerSpec(kind="none"),
        text=TextSpec(encoder="none", dropout=0.0),
        time=TimeSpec(shift=5.0),
        max_cond_frames=2,
        optim=OptimSpec(lr=1e-4, warmup_steps=1),
        sharding=ShardingConfig(param_dtype=param_dtype, checkpointing=checkpointing, compile=compile),
    )
    stage.bench_device = device
    stage._device_mesh = mesh
    stage.configure_model()
    opt = stage.configure_optimizers()["optimizer"]
    return stage, opt


def batch(cfg, grid, device, seed: int) -> dict:
    """One sample's precomputed latents, control latents and text embeddings (float32, as loaded)."""
    x = make_inputs(cfg, grid, device, torch.float32, seed)
    return {
        "latent": x["x"],
        "control_latent": x["ctrl"],
        "text_emb": x["text"],
        "fps": torch.tensor([16.0]),
        "text_mask": torch.ones(1, TEXT_TOKENS, dtype=torch.bool, device=device),
    }


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
    from torch.distributed.device_mesh import DeviceMesh

    group = dist.new_group([0])
    return (
        DeviceMesh.from_group(group, device_type, mesh_dim_names=("data_parallel",)) if dist.get_rank() == 0 else None
    )


def bench_scale(
    preset: str = "2b",
    shapes: str = "720p_93f",
    dmd2_shapes: str = "480p_93f",
    steps: int = 1,
    device: str = "cuda",
    dtype: str = "bfloat16",
    checkpointing: str = "attention",
    dmd2_checkpointing: str = "full",
    compile: bool = False,
    parts: str = ",".join(PARTS),
    context_parallel: int = 2,
    profile: str | None = None,
) -> list[dict]:
    """Run under torchrun (every rank runs this); rank 0 prints JSON rows and the tables."""
    wanted = [p.strip() for p in parts.split(",") if p.strip()]
    if set(wanted) - set(PARTS):
        raise ValueError(f"scale parts must be among {', '.join(PARTS)}, got {parts!r}")
    checkpoint_plan(checkpointing, 1)
    checkpoint_plan(dmd2_checkpointing, 1)
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
    dev = torch.device(f"cuda:{torch.cuda.current_device()}") if cuda else torch.device("cpu")
    dt = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    cfg = net_preset(preset, text_proj_in=None)
    say = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    say(
        json.dumps(
            dict(
                command="vidistill " + " ".join(sys.argv[1:]),
                mode="scale",
                world=world,
                context_parallel=context_parallel,
                torch=torch.__version__,
                python=platform.python_version(),
                device=torch.cuda.get_device_name(dev) if cuda else "cpu",
                nccl=".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
                preset=preset,
                checkpointing=checkpointing,
                dmd2_checkpointing=dmd2_checkpointing,
                compile=compile,
            )
        )
    )
    solo = solo_mesh(dev.type)
    pair = context_mesh(dev.type, world, 1)  # every rank its own sample: (data world, context 1)
    cp_mesh = context_mesh(dev.type, world // context_parallel, context_parallel)
    rows: list[dict] = []

    def add(**row) -> None:
        rows.append(row)
        say(json.dumps(row))

    def measure(fn, n) -> tuple[float, float | None]:
        reset_peak(dev)
        t = timed(fn, n, dev)
        return t, peak_gib(dev)

    grids = {s: parse_shape(s) for s in shapes.split(",")}
    if {"control", "cp_train"} & set(wanted):
        one: dict[str, float] = {}
        if rank == 0:
            stage, opt = control_stage(preset, dev, checkpointing, compile, solo, dtype)
            for shape, grid in grids.items():
                b = batch(cfg, grid, dev, seed=0)
                t, mem = measure(lambda: control_step(stage, opt, b), steps)
                one[shape] = t
                add(
                    part="control",
                    shape=shape,
                    gpus=1,
                    layout="1 GPU",
                    seconds=round(t, 3),
                    peak_GiB=mem and round(mem, 1),
                    samples_per_s=round(1 / t, 4),
                    ratio=1.0,
                )
            del stage, opt
            free(dev)
        one = from_rank0(one)
        stage, opt = control_stage(preset, dev, checkpointing, compile, pair, dtype)
        for shape, grid in grids.items():
            if "control" in wanted:
                stage._device_mesh = pair  # data rank = rank: each rank its own sample and draws
                b = batch(cfg, grid, dev, seed=rank)
                t, mem = measure(lambda: control_step(stage, opt, b), steps)
                t = slowest(t, dev)
                add(
                    part="control",
                    shape=shape,
                    gpus=world,
                    layout=f"FSDP2 data x{world}",
                    seconds=round(t, 3),
                    peak_GiB=mem and round(mem, 1),
                    samples_per_s=round(world / t, 4),
                    ratio=round(one[shape] / t, 3),
                )  # efficiency: throughput per GPU against one GPU
            if "cp_train" in wanted:
                stage._device_mesh = cp_mesh  # one context group shares its sample and draws
                stage.model.set_context_parallel(context_group(cp_mesh))
                b = batch(cfg, grid, dev, seed=0)
                t, mem = measure(lambda: control_step(stage, opt, b), steps)
                t = slowest(t, dev)
                add(
                    part="cp_train",
                    shape=shape,
                    gpus=world,
                    layout=f"FSDP2 data x{world // context_parallel} x context {context_parallel}",
                    seconds=round(t, 3),
                    peak_GiB=mem and round(mem, 1),
                    samples_per_s=round(world // context_parallel / t, 4),
                    ratio=round(t / one[shape], 3),
                )  # step time against one GPU
                if profile:
                    write_profile(lambda: control_step(stage, opt, b), dev, profile, f"cp_train_{shape}", rank)
                stage.model.set_context_parallel(None)
        del stage, opt
        free(dev)

    if "cp_infer" in wanted:
        model = Denoiser.build(cfg, device=dev, dtype=dt).eval()
        gen = Sampler(model)
        sampler = SamplerConfig(sampler="student", t_list=(1.0, 0.75, 0.5, 0.25), shift=5.0)
        steps_per = len(sampler.t_list)
        for shape, grid in grids.items():
            x = make_inputs(cfg, grid, dev, torch.float32, 0)
            cond = Cond(text=x["text"], controls={"edge": x["ctrl"]}, fps=16.0)

            @torch.no_grad()
            def sample():
                g = torch.Generator(device=dev).manual_seed(0)
                with torch.autocast(dev.type, dt, enabled=dt != torch.float32):
                    gen.sample(cond, x["x"], sampler, generator=g)

            t1 = None
            if rank == 0:
                t1, mem = measure(sample, steps)
                add(
                    part="cp_infer",
                    shape=shape,
                    gpus=1,
                    layout="1 GPU",
                    seconds=round(t1 / steps_per, 3),
                    peak_GiB=mem and round(mem, 1),
                    samples_per_s=None,
                    ratio=1.0,
                )
            t1 = from_rank0(t1)
            model.set_context_parallel(context_group(cp_mesh))
            t, mem = measure(sample, steps)
            t = slowest(t, dev)
            model.set_context_parallel(None)
            add(
                part="cp_infer",
                shape=shape,
                gpus=world,
                layout=f"context {context_parallel}",
                seconds=round(t / steps_per, 3),
                peak_GiB=mem and round(mem, 1),
                samples_per_s=None,
                ratio=round(t / t1, 3),
            )
        del model, gen
        free(dev)

    if "dmd2" in wanted:
        bench_dmd2_scale(preset, dmd2_shapes, steps, dev, dt, dmd2_checkpointing, compile, solo, pair, add)
    if rank == 0:
        print(format_tables(rows), flush=True)
    dist.barrier()
    return rows


def bench_dmd2_scale(preset, shapes, steps, dev, dt, checkpointing, compile, solo, pair, add) -> None:
    """DMD2 student and critic turns, FSDP2 on one GPU against all ranks (rows go through `add`)."""
    from tools.bench_dmd2 import build_stage, full_simulation_turns, prime_optimizers, turn_step

    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = net_preset(preset, text_proj_in=None)
    grids = {s: parse_shape(s) for s in shapes.split(",")}

    def run(mesh, seed) -> dict:
        stage = build_stage(preset, dev, dt, checkpointing, compile, "all", mesh=mesh)
        optimizers, schedulers = stage.configure_optimizers()
        prime_optimizers(optimizers)
        turns = full_simulation_turns(stage)
        out = {}
        for shape, grid in grids.items():
            b = batch(cfg, grid, dev, seed)
            b.pop("fps")
            for entry, student in (("student turn", True), ("critic turn", False)):
                reset_peak(dev)
                try:
                    t = timed(lambda: turn_step(stage, optimizers, schedulers, b, turns[student], student), steps, dev)
                    out[shape, entry] = (t, peak_gib(dev))
                except torch.OutOfMemoryError:
                    for opt in optimizers:
                        opt.zero_grad(set_to_none=True)
                    out[shape, entry] = (float("nan"), peak_gib(dev))
        del stage, optimizers, schedulers
        free(dev)
        return out

    one = from_rank0(run(solo, 0) if rank == 0 else None)
    for (shape, entry), (t, mem) in one.items():
        add(
            part="dmd2",
            entry=entry,
            shape=shape,
            gpus=1,
            layout="1 GPU",
            seconds=round(t, 3),
            peak_GiB=mem and round(mem, 1),
            samples_per_s=round(1 / t, 4),
            ratio=1.0,
        )
    many = run(pair, rank)
    for (shape, entry), (t, mem) in many.items():
        t = slowest(t, dev)
        add(
            part="dmd2",
            entry=entry,
            shape=shape,
            gpus=world,
            layout=f"FSDP2 data x{world}",
            seconds=round(t, 3),
            peak_GiB=mem and round(mem, 1),
            samples_per_s=round(world / t, 4),
            ratio=round(one[shape, entry][0] / t, 3),
        )


def write_profile(step, dev: torch.device, folder: str, name: str, rank: int, top: int = 25) -> None:
    """One more step under torch.profiler on every rank; rank 0 writes its top kernels by device time."""
    from pathlib import Path

    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    if rank == 0:
        key = "self_device_time_total" if dev.type == "cuda" else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=key, row_limit=top, max_name_column_width=70)
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
