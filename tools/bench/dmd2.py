"""`vidistill bench --mode dmd2`: a KD warmup step, a DMD2 student turn and a critic turn against
the control-training step, in one process on one device, with the same inputs.

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

The KD step is the KD warmup stage's own code (tools/bench/kd_stage.py): a modules.stages.KDWarmup
built as the 2b edge `kd.yaml` recipe sets it up (student from the teacher's preset, trainable
`all`; the same t-list; AdamW lr 1e-5) runs one optimizer step: its `loss` (one student forward
with gradient from a teacher state, modules/distill.py's kd_loss), then what the Trainer adds
(zero grad, backward, gradient-norm clip 1.0, AdamW step, scheduler step). Its batch is the
control step's latents, control latents and text, with KD noise and teacher states at the
student's times made from them (kd_stage.kd_batch). The control network, the KD stage and the
DMD2 stage are built one after the other, each freed before the next (2b: one big stage at a
time), so the KD step's and the turns' peak memory hold their own stage only.

Differences from a `vidistill fit` run, all shared with `--mode net` so the ratio compares like
with like: no FSDP (one process, no process group), parameters and AdamW states in `dtype`
(bf16 on the GPU) instead of fp32 masters under a bf16 mixed-precision policy; the networks'
inputs are cast to `dtype` as that policy would. The optimizers' states (the KD student's, DMD2's
two) exist before any timing (one zero-gradient AdamW step each), as after the first steps of
training, so each peak memory holds them. The negative prompt is the recipe's (`negative_prompt:
null`, the null text): the same two teacher calls as a named prompt's precomputed embedding.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable

import torch

from modules.nets import preset as net_preset
from modules.nets import set_backend
from modules.nets.dit import set_sparse
from modules.parallel import set_checkpointing, set_compile
from tools.bench.common import (
    Grid,
    Options,
    Variant,
    free,
    header,
    out_of_memory,
    parse_shape,
    parse_sparse,
    plan_variants,
    sig,
    stage_batch,
)
from tools.bench.control import Ours, measure
from tools.bench.dmd2_stage import Turns, dynamo_graphs, networks
from tools.bench.kd_stage import KD_GRADIENT_CLIP, KDSteps, kd_batch

ENTRIES = ("control step", "KD step", "student turn", "critic turn")
TURN_ENTRIES = ENTRIES[2:]


def bench_dmd2(opts: Options, student_trainable: str = "all") -> list[dict]:
    """Time the control step, a KD step, a DMD2 student turn and a critic turn per configuration
    and shape; print JSON rows and a table; return the rows (ratio = time / the control step's
    time in the same configuration and shape). `opts.variants`: tools.bench.common.parse_variants syntax; the
    keys used are checkpointing, compile, attention_backend, shapes, steps and sparse (the student's)."""
    if opts.steps < 1:
        raise ValueError("steps must be >= 1")
    dev, dt = opts.torch_device, opts.torch_dtype
    cfg = net_preset(opts.preset, text_proj_in=None)
    runs = plan_variants(opts, infer=False)
    if student_trainable not in ("all", "control"):
        raise ValueError(f"student_trainable must be all or control, got {student_trainable!r}")
    plan = [(v, s, parse_shape(s)) for v in runs for s in (v.shapes or opts.shapes).split(",")]
    # One process compiles the blocks of three stages' networks (control, KD, DMD2): more variants
    # of the block function every block shares (modules/nets/dit.py) than one fit run compiles (7
    # in the tiny CPU test, Dynamo's default limit is 8), and past the limit a block would run
    # eagerly unnoticed. new_graphs and TORCH_LOGS=recompiles still show every graph compiled.
    limit = max(torch._dynamo.config.recompile_limit, 32)
    with torch._dynamo.config.patch(recompile_limit=limit):
        rows = measure_stages(opts, cfg, plan, student_trainable, dev, dt)
    print(format_table(rows))
    return rows


def measure_stages(
    opts: Options, cfg, plan: list[tuple[Variant, str, Grid]], student_trainable: str, dev: torch.device, dt
) -> list[dict]:
    """Every configuration's rows: the control steps, the KD steps and the DMD2 turns."""
    # one network or stage alive at a time, each freed before the next is built: the control
    # steps, then the KD steps, then the DMD2 turns, whose peak memory then holds DMD2 alone
    first = plan[0][0]
    control, control_params = measure_control_steps(opts, cfg, plan, dev, dt)
    kd, kd_info = measure_kd_steps(opts, cfg, plan, control, dev, dt)
    turns = Turns.build(opts.preset, dev, dt, first.checkpointing, first.compile, student_trainable)
    if len(plan) > 1:
        turns.keep_initial()  # every configuration's turns start from the same weights: losses compare
    print(json.dumps(dmd2_header(opts, cfg, dev, turns, student_trainable, control_params, kd_info)), flush=True)
    rows = []
    for v, shape, grid in plan:
        key = v.label(), shape
        rows += measure_turns(turns, cfg, v, shape, grid, control[key], kd[key], dev, dt, v.steps or opts.steps)
    del turns
    free(dev)
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


def configure(nets, v: Variant) -> None:
    """A configuration's checkpointing and compilation on every block of `nets`, its attention
    backend, and its sparse attention on the first network alone (the student: the teacher and
    the fake score of a sparse student stay dense, as in the recipes)."""
    for net in nets:
        set_checkpointing(net, v.checkpointing)
        set_compile(net, v.compile)
    set_backend(v.attention_backend)
    set_sparse(nets[0], parse_sparse(v.sparse))


def measure_kd_steps(
    opts: Options, cfg, plan: list[tuple[Variant, str, Grid]], control: dict, dev: torch.device, dt: torch.dtype
) -> tuple[dict[tuple[str, str], list[dict]], dict]:
    """{(configuration, shape): the KD step's row, then with compiled blocks its recompile check}
    and what the header says of the KD stage. The stage is built once for every configuration
    (each starting from the same weights and optimizer state, as the turns do) and freed before
    the DMD2 stage is built."""
    first = plan[0][0]  # the stage is built with the first configuration's blocks, then reconfigured
    kd = KDSteps.build(opts.preset, dev, dt, first.checkpointing, first.compile)
    if len(plan) > 1:
        kd.keep_initial()
    spec = kd.stage.optim_spec
    info = dict(
        t_list=list(kd.stage.times),
        trainable=kd.stage.trainable,
        lr=spec.lr,
        warmup_steps=spec.warmup_steps,
        gradient_clip=KD_GRADIENT_CLIP,
        trainable_params=kd.trainable_params(),
    )
    out = {}
    for v, shape, grid in plan:
        seconds = control[v.label(), shape]["seconds"]
        out[v.label(), shape] = measure_kd(kd, cfg, v, shape, grid, seconds, dev, dt, v.steps or opts.steps)
    del kd
    free(dev)
    return out, info


def measure_kd(
    kd: KDSteps, cfg, v: Variant, shape: str, grid: Grid, control_s: float | None, dev: torch.device, dt, steps: int
) -> list[dict]:
    """The KD step's row on the control step's inputs (with a teacher trajectory through them,
    kd_batch), with the losses of its runs (warm-up first; the same sequence in every
    configuration) and the graphs Dynamo compiled meanwhile; with compiled blocks and no error,
    then a `"KD steps after warm-up"` line: the graphs compiled by the timed runs, which must be 0."""
    kd.reset()
    torch.manual_seed(0)
    configure([kd.stage.model], v)
    batch = kd_batch(kd.stage, stage_batch(cfg, grid, dev, dt))
    common = dict(shape=shape, configuration=v.label())
    graphs = dynamo_graphs()
    run = functools.partial(kd.measure, batch, steps, dev)
    row = dict(common, entry="KD step", exit_step=None) | figures(run, control_s)
    row.update(losses=[float(x) for x in kd.losses], new_graphs=dynamo_graphs() - graphs)
    out = [row]
    if v.compile and not row["error"]:
        out.append(dict(common, entry="KD steps after warm-up", new_graphs=kd.graphs[-1] - kd.graphs[0]))
    del batch, run  # the batch's KD states, before the next configuration's
    free(dev)
    return out


def dmd2_header(
    opts: Options, cfg, dev: torch.device, turns: Turns, student_trainable: str, control_params: int, kd_info: dict
):
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
            "KD step": kd_info["trainable_params"],
            "student": trainable(stage.student.parameters()),
            "critic": trainable(stage.critic_parameters()),
        },
        kd={k: v for k, v in kd_info.items() if k != "trainable_params"},
        config=dataclasses.asdict(cfg.dit),
        control=dataclasses.asdict(cfg.control),
    )


def measure_turns(
    turns: Turns,
    cfg,
    v: Variant,
    shape: str,
    grid: Grid,
    ctrl: dict,
    kd: list[dict],
    dev: torch.device,
    dt: torch.dtype,
    steps: int,
) -> list[dict]:
    """The rows of one configuration and shape: the control step and the KD step (measured
    before, `kd` from measure_kd), then a student and a critic turn on the control step's inputs,
    each with the losses of its runs (warm-up first; every configuration starts from the same
    weights and draws the same noise, so they compare across configurations) and the graphs
    Dynamo compiled meanwhile. With compiled blocks, one more student and critic turn then shows
    whether alternating turns recompile."""
    turns.reset()
    torch.manual_seed(0)
    configure(networks(turns.stage), v)
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
    rows.append(kd[0])
    for line in kd:  # the row, then its recompile check (not a row)
        print(json.dumps(line), flush=True)
    for entry, student in (("student turn", True), ("critic turn", False)):
        row = dict(common, entry=entry, exit_step=len(turns.stage.times) - 1)
        graphs = dynamo_graphs()
        run = functools.partial(turns.measure, batch, student, steps, dev)
        rows.append(row | figures(run, ctrl["seconds"]))
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


def figures(measure: Callable[[], tuple[float, float | None]], control_s: float | None) -> dict:
    """The seconds, peak GiB, ratio to the control step and error (None, or out of memory) of a
    turn or KD step, from `measure` (its median seconds and peak GiB)."""
    try:
        sec, mem = measure()
    except torch.OutOfMemoryError as e:
        return dict(seconds=None, peak_GiB=None, ratio=None, error=out_of_memory(e))
    ratio = round(sec / control_s, 2) if control_s else None
    return dict(seconds=sig(sec), peak_GiB=mem and round(mem, 1), ratio=ratio, error=None)


def format_table(rows: list[dict]) -> str:
    """Markdown table plus, per configuration and shape, the KD step's and each turn's time over
    the control step's; the 3.5x target is the DMD2 turns' (docs/benchmarks.md)."""
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
        turns = [r for e, r in measured.items() if e in TURN_ENTRIES]
        verdict = "not measured" if not turns else "met" if max(turns) <= 3.5 else "missed"
        lines.append(f"{shape} [{conf}]: {ratios} the control step (DMD2 turns' target <= 3.5x: {verdict})")
    return "\n".join(lines)
