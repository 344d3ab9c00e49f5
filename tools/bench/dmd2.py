"""`vidistill bench --mode dmd2`: a DMD2 student turn and a critic turn against the control-training
step, in one process on one device, with the same inputs.

The control step is `--mode net`'s, for ours (tools.bench.control's Ours through its measure: base
frozen, control branch trained, MSE, AdamW). The turns are the DMD2 stage's own code: a
modules.stages.DMD2 LightningModule is built as the 2b edge `dmd2.yaml` recipe sets it up (student
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

import torch

from modules.nets import preset as net_preset
from modules.nets import set_backend
from modules.parallel import set_checkpointing, set_compile
from tools.bench.common import (
    Grid,
    Options,
    Variant,
    free,
    header,
    out_of_memory,
    parse_shape,
    plan_variants,
    sig,
    stage_batch,
)
from tools.bench.control import Ours, measure
from tools.bench.dmd2_stage import Turns, dynamo_graphs, networks

ENTRIES = ("control step", "student turn", "critic turn")


def bench_dmd2(opts: Options, student_trainable: str = "all") -> list[dict]:
    """Time the control step, a DMD2 student turn and a critic turn per configuration and shape;
    print JSON rows and a table; return the rows (ratio = time / the control step's time in the
    same configuration and shape). `opts.variants`: tools.bench.common.parse_variants syntax; the
    keys used are checkpointing, compile, attention_backend, shapes and steps."""
    if opts.steps < 1:
        raise ValueError("steps must be >= 1")
    dev, dt = opts.torch_device, opts.torch_dtype
    cfg = net_preset(opts.preset, text_proj_in=None)
    runs = plan_variants(opts, infer=False)
    if student_trainable not in ("all", "control"):
        raise ValueError(f"student_trainable must be all or control, got {student_trainable!r}")
    plan = [(v, s, parse_shape(s)) for v in runs for s in (v.shapes or opts.shapes).split(",")]

    # control steps first and their network freed: a turn's peak memory then holds DMD2 alone
    control, control_params = measure_control_steps(opts, cfg, plan, dev, dt)
    turns = Turns.build(opts.preset, dev, dt, runs[0].checkpointing, runs[0].compile, student_trainable)
    if len(plan) > 1:
        turns.keep_initial()  # every configuration's turns start from the same weights: losses compare
    print(json.dumps(dmd2_header(opts, cfg, dev, turns, student_trainable, control_params)), flush=True)
    rows = []
    for v, shape, grid in plan:
        rows += measure_turns(turns, cfg, v, shape, grid, control[v.label(), shape], dev, dt, v.steps or opts.steps)
    del turns
    free(dev)
    print(format_table(rows))
    return rows


def measure_control_steps(
    opts: Options, cfg, plan: list[tuple[Variant, str, Grid]], dev: torch.device, dt: torch.dtype
) -> tuple[dict[tuple[str, str], dict], int]:
    """{(configuration, shape): the control step's seconds, peak GiB and error} and the step's
    trained parameter count."""
    control: dict[tuple[str, str], dict] = {}
    impl = Ours(cfg, dev, dt, plan[0][0])
    params = sum(p.numel() for p in impl.params)
    for v, shape, grid in plan:
        impl.configure(v)
        r = measure(impl, cfg, {shape: grid}, dev, v.steps or opts.steps, opts.peak_tflops, infer=False)[0]
        control[v.label(), shape] = dict(seconds=r["train_step_s"], peak_GiB=r["train_peak_GiB"], error=r.get("error"))
    del impl
    free(dev)
    return control, params


def dmd2_header(opts: Options, cfg, dev: torch.device, turns: Turns, student_trainable: str, control_params: int):
    stage = turns.stage

    def trainable(params) -> int:
        return sum(p.numel() for p in params if p.requires_grad)

    return header(
        "dmd2",
        dev,
        preset=opts.preset,
        dtype=opts.dtype,
        student_trainable=student_trainable,
        t_list=list(stage.times),
        guidance=stage.guidance,
        gan=dataclasses.asdict(stage.gan),
        max_cond_frames=stage.max_cond_frames,
        turns={"student": turns.numbers[True], "critic": turns.numbers[False]},
        exit_step=len(stage.times) - 1,
        trainable_params={
            "control step": control_params,
            "student": trainable(stage.student.parameters()),
            "critic": trainable(stage.critic_parameters()),
        },
        config=dataclasses.asdict(cfg.dit),
        control=dataclasses.asdict(cfg.control),
    )


def measure_turns(
    turns: Turns, cfg, v: Variant, shape: str, grid: Grid, ctrl: dict, dev: torch.device, dt: torch.dtype, steps: int
) -> list[dict]:
    """The rows of one configuration and shape: the control step (measured before), then a
    student and a critic turn on the control step's inputs, each with the losses of its runs
    (warm-up first; every configuration starts from the same weights and draws the same noise, so
    they compare across configurations) and the graphs Dynamo compiled meanwhile. With compiled
    blocks, one more student and critic turn then shows whether alternating turns recompile."""
    turns.reset()
    torch.manual_seed(0)
    for net in networks(turns.stage):
        set_checkpointing(net, v.checkpointing)
        set_compile(net, v.compile)
    set_backend(v.attention_backend)
    batch = stage_batch(cfg, grid, dev, dt)
    common = dict(shape=shape, configuration=v.label())
    rows = [
        dict(
            common,
            entry="control step",
            exit_step=None,
            seconds=ctrl["seconds"],
            peak_GiB=ctrl["peak_GiB"],
            ratio=1.0 if ctrl["seconds"] else None,
            error=ctrl["error"],
        )
    ]
    print(json.dumps(rows[-1]), flush=True)
    for entry, student in (("student turn", True), ("critic turn", False)):
        row = dict(common, entry=entry, exit_step=len(turns.stage.times) - 1)
        graphs = dynamo_graphs()
        rows.append(row | turn_figures(turns, batch, student, ctrl["seconds"], steps, dev))
        rows[-1].update(losses=[float(x) for x in turns.losses], new_graphs=dynamo_graphs() - graphs)
        print(json.dumps(rows[-1]), flush=True)
        free(dev)
    if v.compile and not any(r["error"] for r in rows[1:]):
        graphs = dynamo_graphs()
        turns.losses = []
        turns.step(batch, True)
        turns.step(batch, False)
        check = dict(common, entry="alternating turns", new_graphs=dynamo_graphs() - graphs)
        print(json.dumps(check | dict(losses=[float(x) for x in turns.losses])), flush=True)
        free(dev)
    return rows


def turn_figures(turns: Turns, batch: dict, student: bool, control_s: float | None, steps: int, dev) -> dict:
    """A turn's seconds, peak GiB, ratio to the control step and error (None, or out of memory)."""
    try:
        sec, mem = turns.measure(batch, student, steps, dev)
    except torch.OutOfMemoryError as e:
        return dict(seconds=None, peak_GiB=None, ratio=None, error=out_of_memory(e))
    ratio = round(sec / control_s, 2) if control_s else None
    return dict(seconds=sig(sec), peak_GiB=mem and round(mem, 1), ratio=ratio, error=None)


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
