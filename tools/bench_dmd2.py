"""`vidistill bench --mode dmd2`: a DMD2 student turn and a critic turn against the control-training
step, in one process on one device, with the same inputs.

The control step is `--mode net`'s, for ours (tools.bench.Ours through tools.bench.measure: base
frozen, control branch trained, MSE, AdamW). The turns are the DMD2 stage's own code: a
modules.dmd2.DMD2 LightningModule is built as the 2b edge `dmd2.yaml` recipe sets it up (student
and fake score start from the teacher's preset; student trainable `all` unless told otherwise;
fake score trainable; frozen teacher with CFG 3 against the negative prompt, two teacher calls;
the GAN head of modules/nets/gan.py on the fake score's block depth/2 - 1 (13 of 28), 1024 wide;
t-list 1.0, 0.75, 0.5, 0.25 shifted by 5; up to 2 conditioning frames; gradient clip 1.0), and each
turn calls its `turn_loss` (modules/distill.py's generator_turn_loss / critic_turn_loss, the
backward simulation included). What a Trainer would add is re-composed from
DMD2.training_step: zero both optimizers' gradients, backward, clip the stepped optimizer's
gradient norm, AdamW step (the stage's configure_optimizers), scheduler step. Not included: the
EMA update after a student turn and logging.

Each turn is measured at its costliest exit step: the turn number is chosen so that
`distill.choose_exit_step` returns the last student step, i.e. the full backward simulation
(3 student forwards without grad before the student's prediction, for the 4-step t-list).

Differences from a `vidistill fit` run, all shared with `--mode net` so the ratio compares like
with like: no FSDP (one process, no process group), parameters and AdamW states in `dtype`
(bf16 on the GPU) instead of fp32 masters under a bf16 mixed-precision policy; the networks'
inputs are cast to `dtype` as that policy would. Both optimizers' states exist before any
timing (one zero-gradient AdamW step each), as after the first turns of training, so each
turn's peak memory holds both. The negative prompt is the recipe's (`negative_prompt: null`, the
null text): the same two teacher calls as a named prompt's precomputed embedding.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import sys

import torch

from modules import distill
from modules.denoiser import Cond, Denoiser
from modules.nets import preset as net_preset
from modules.nets import set_backend
from modules.nets.dit import checkpoint_plan
from modules.parallel import ShardingConfig, set_checkpointing, set_compile
from modules.stages.base import NetSpec, OptimSpec, TextSpec, TokenizerSpec
from modules.stages.dmd2 import DMD2, GANSpec
from tools.bench import (
    TEXT_TOKENS,
    Ours,
    Variant,
    free,
    make_inputs,
    measure,
    parse_shape,
    parse_variants,
    peak_gib,
    reset_peak,
    timed,
)

ENTRIES = ("control step", "student turn", "critic turn")


class OnDevice(DMD2):
    """The DMD2 stage, its networks materialised on `bench_device` without a Trainer (the stage
    otherwise builds on CPU when no Trainer gives it a device)."""

    bench_device: torch.device = torch.device("cpu")

    def build_device(self) -> torch.device:
        return self.bench_device


def _cast(value, dtype: torch.dtype):
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, Cond):
        return dataclasses.replace(
            value, **{f.name: _cast(getattr(value, f.name), dtype) for f in dataclasses.fields(value)}
        )
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    return value


def cast_inputs(model: Denoiser, dtype: torch.dtype) -> None:
    """Cast the latents and conditioning the stage hands `model` (float32) to the parameters'
    dtype, as FSDP2's mixed-precision policy does on a sharded run; t stays float32, as the
    samplers feed it."""
    for name in ("denoise", "features"):
        method = getattr(model, name)

        def call(x_t, t, cond, *rest, _method=method):
            return _method(_cast(x_t, dtype), t, _cast(cond, dtype), *rest)

        setattr(model, name, call)


def build_stage(
    preset: str,
    device: torch.device,
    dtype: torch.dtype,
    checkpointing: str,
    compile: bool,
    student_trainable: str,
    mesh=None,
) -> OnDevice:
    """The DMD2 stage with the 2b edge dmd2.yaml's settings (see the module docstring). With a
    device `mesh` (tools/bench_scale.py) the networks are sharded as in a `fit` run: FSDP2 over
    the mesh, fp32 parameters computed in `dtype` by the mixed-precision policy."""
    depth = net_preset(preset).dit.depth
    stage = OnDevice(
        teacher=NetSpec(preset=preset, overrides={"text_proj_in": None}),
        modality="edge",
        t_list=(1.0, 0.75, 0.5, 0.25),
        t_shift=5.0,
        student_trainable=student_trainable,
        guidance=3.0,
        negative_prompt=None,
        student_update_freq=5,
        gan=GANSpec(
            weight=1e-3, critic_weight=1e-2, features="fake_score", taps=(max(0, depth // 2 - 1),), hidden=1024
        ),
        student_optim=OptimSpec(lr=1e-6, warmup_steps=100),
        critic_optim=OptimSpec(lr=2e-7, warmup_steps=100),
        gradient_clip=1.0,
        max_cond_frames=2,
        tokenizer=TokenizerSpec(kind="none"),
        text=TextSpec(encoder="none"),
        sharding=ShardingConfig(checkpointing=checkpointing, compile=compile),
    )
    stage.bench_device = device
    if mesh is not None:
        stage._device_mesh = mesh
        stage.sharding.param_dtype = {torch.bfloat16: "bfloat16", torch.float32: "float32"}[dtype]
        stage.configure_model()
        return stage
    stage.configure_model()  # builds in float32 (init_weights draws float32), then one cast
    stage.to(dtype)
    if dtype != torch.float32:
        for net in networks(stage):
            cast_inputs(net, dtype)
    return stage


def networks(stage: DMD2) -> tuple[Denoiser, Denoiser, Denoiser]:
    return stage.student, stage.teacher, stage.fake_score


def full_simulation_turns(stage: DMD2, search: int = 10_000) -> dict[bool, int]:
    """{is_student_turn: the first turn number of that kind whose exit step is the last student
    step} (exit steps are a pure function of seed and turn: distill.choose_exit_step)."""
    last, found = len(stage.times) - 1, {}
    for turn in range(search):
        kind = distill.student_turn(turn, stage.freq)
        if kind not in found and distill.choose_exit_step(len(stage.times), turn, stage.seed) == last:
            found[kind] = turn
            if len(found) == 2:
                return found
    raise RuntimeError(f"no turn in the first {search} exits at step {last}")


def prime_optimizers(optimizers) -> None:
    """One AdamW step on zero gradients: creates the moment buffers (weights move by weight decay only)."""
    for opt in optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)


def turn_step(stage: DMD2, optimizers, schedulers, batch: dict, turn: int, student: bool) -> None:
    """DMD2.training_step for one turn of one micro-batch, without the Trainer's plumbing."""
    i = 0 if student else 1
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    loss, _ = stage.turn_loss(batch, turn, 0, student)
    (loss.mean() / stage.micro_batches).backward()
    if stage.gradient_clip:
        params = [p for group in optimizers[i].param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, stage.gradient_clip)  # what Lightning's clip_gradients calls
    optimizers[i].step()
    schedulers[i].step()


def _sig(x: float) -> float:
    return float(f"{x:.4g}")


def bench_dmd2(
    preset: str = "2b",
    shapes: str = "480p_93f",
    steps: int = 1,
    device: str = "cuda",
    dtype: str = "bfloat16",
    checkpointing: str = "full",
    compile: bool = False,
    attention_backend: str = "auto",
    variants: str | None = None,
    student_trainable: str = "all",
    peak_tflops: float = 790.0,
) -> list[dict]:
    """Time the control step, a DMD2 student turn and a critic turn per configuration and shape;
    print JSON rows and a table; return the rows (ratio = time / the control step's time in the
    same configuration and shape). `variants`: tools.bench.parse_variants syntax; the keys used
    are checkpointing, compile, attention_backend, shapes and steps."""
    if steps < 1:
        raise ValueError("steps must be >= 1")
    dev = torch.device(device)
    dt = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    cfg = net_preset(preset, text_proj_in=None)
    base = Variant(checkpointing=checkpointing, compile=compile, attention_backend=attention_backend, infer=False)
    runs = [base] + parse_variants(variants, base)
    for v in runs:  # refuse a bad option before minutes of measuring
        checkpoint_plan(v.checkpointing, 1)
        set_backend(v.attention_backend)
        [parse_shape(s) for s in (v.shapes or shapes).split(",")]
    if student_trainable not in ("all", "control"):
        raise ValueError(f"student_trainable must be all or control, got {student_trainable!r}")
    plan = [(v, s, parse_shape(s)) for v in runs for s in (v.shapes or shapes).split(",")]

    # control steps first and their network freed: a turn's peak memory then holds DMD2 alone
    control: dict[tuple[str, str], dict] = {}
    impl = Ours(cfg, dev, dt, base)
    control_params = sum(p.numel() for p in impl.params)
    for v, shape, grid in plan:
        impl.configure(v)
        r = measure(impl, cfg, {shape: grid}, dev, v.steps or steps, peak_tflops, infer=False)[0]
        control[v.label(), shape] = dict(seconds=r["train_step_s"], peak_GiB=r["train_peak_GiB"], error=r.get("error"))
    del impl
    free(dev)

    stage = build_stage(preset, dev, dt, base.checkpointing, base.compile, student_trainable)
    optimizers, schedulers = stage.configure_optimizers()
    prime_optimizers(optimizers)
    turns = full_simulation_turns(stage)
    count = lambda params: sum(p.numel() for p in params if p.requires_grad)
    header = dict(
        command="vidistill " + " ".join(sys.argv[1:]),
        mode="dmd2",
        torch=torch.__version__,
        python=platform.python_version(),
        device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        preset=preset,
        dtype=dtype,
        student_trainable=student_trainable,
        t_list=list(stage.times),
        guidance=stage.guidance,
        gan=dataclasses.asdict(stage.gan),
        max_cond_frames=stage.max_cond_frames,
        turns={"student": turns[True], "critic": turns[False]},
        exit_step=len(stage.times) - 1,
        trainable_params={
            "control step": control_params,
            "student": count(stage.student.parameters()),
            "critic": count(stage.critic_parameters()),
        },
        config=dataclasses.asdict(cfg.dit),
        control=dataclasses.asdict(cfg.control),
    )
    print(json.dumps(header), flush=True)

    rows = []
    for v, shape, grid in plan:
        for net in networks(stage):
            set_checkpointing(net, v.checkpointing)
            set_compile(net, v.compile)
        set_backend(v.attention_backend)
        x = make_inputs(cfg, grid, dev, dt)  # the control step's inputs
        batch = {
            "latent": x["x"],
            "control_latent": x["ctrl"],
            "text_emb": x["text"],
            "text_mask": torch.ones(1, TEXT_TOKENS, dtype=torch.bool, device=dev),
        }
        ctrl = control[v.label(), shape]
        common = dict(shape=shape, configuration=v.label())
        rows.append(
            dict(
                common,
                entry="control step",
                exit_step=None,
                seconds=ctrl["seconds"],
                peak_GiB=ctrl["peak_GiB"],
                ratio=1.0 if ctrl["seconds"] else None,
                error=ctrl["error"],
            )
        )
        print(json.dumps(rows[-1]), flush=True)
        for entry, student in (("student turn", True), ("critic turn", False)):
            row = dict(
                common, entry=entry, exit_step=len(stage.times) - 1, seconds=None, peak_GiB=None, ratio=None, error=None
            )
            try:
                reset_peak(dev)
                sec = timed(
                    lambda: turn_step(stage, optimizers, schedulers, batch, turns[student], student),
                    v.steps or steps,
                    dev,
                )
                mem = peak_gib(dev)
                row.update(
                    seconds=_sig(sec),
                    peak_GiB=mem and round(mem, 1),
                    ratio=round(sec / ctrl["seconds"], 2) if ctrl["seconds"] else None,
                )
            except torch.OutOfMemoryError as e:
                for opt in optimizers:
                    opt.zero_grad(set_to_none=True)
                row["error"] = "out of memory: " + str(e).split(".")[0]
            rows.append(row)
            print(json.dumps(row), flush=True)
            free(dev)
    del stage, optimizers, schedulers
    free(dev)
    print(format_table(rows))
    return rows


def format_table(rows: list[dict]) -> str:
    """Markdown table plus, per configuration and shape, each turn's time over the control step's."""
    lines = ["| shape | configuration | entry | s | peak GiB | x control step |", "|---|---|---|---|---|---|"]
    for r in rows:
        if r["error"]:
            lines.append(f"| {r['shape']} | {r['configuration']} | {r['entry']} | {r['error']} | | |")
        else:
            lines.append(
                f"| {r['shape']} | {r['configuration']} | {r['entry']} | {r['seconds']} | {r['peak_GiB']} "
                f"| {r['ratio']} |"
            )
    lines.append("")
    groups: dict[tuple[str, str], dict[str, dict]] = {}
    for r in rows:
        groups.setdefault((r["shape"], r["configuration"]), {})[r["entry"]] = r
    for (shape, conf), by in groups.items():
        measured = {e: by[e]["ratio"] for e in ENTRIES[1:] if by.get(e, {}).get("ratio") is not None}
        ratios = ", ".join(f"{e} {r:.2f}x" for e, r in measured.items()) or "no ratio"
        verdict = "not measured" if not measured else "met" if max(measured.values()) <= 3.5 else "missed"
        lines.append(f"{shape} [{conf}]: {ratios} the control step (target <= 3.5x: {verdict})")
    return "\n".join(lines)
