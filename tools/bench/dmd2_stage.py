"""The DMD2 stage the bench times (`--mode dmd2` on one device, `--mode scale` FSDP2-sharded): built
as the 2b edge `dmd2.yaml` recipe sets it up, its turns run as DMD2.training_step runs them.

What a Trainer would add around a turn is re-composed from DMD2.training_step: zero both
optimizers' gradients, backward, clip the stepped optimizer's gradient norm, AdamW step (the
stage's configure_optimizers), scheduler step. Not included: the EMA update after a student turn
and logging. Each turn is run at its costliest exit step (`full_simulation_turns`).

What tools/bench/kd_stage.py's KD step shares with the turns is here too: a stage built on the
bench's device (`BenchDevice`, `cast_inputs`), its optimizer states created before timing
(`prime_optimizers`), kept and reset so that every configuration starts from the same state
(`StageRuns`).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Callable

import torch

from modules import distill
from modules.denoiser import Cond, Denoiser
from modules.nets import preset as net_preset
from modules.parallel import ShardingConfig
from modules.stages.base import NetSpec, OptimSpec, StageOptions, TextSpec, TokenizerSpec
from modules.stages.dmd2 import DMD2, GANSpec
from tools.bench.common import timed_peak


class BenchDevice:
    """Mixin for a stage: its networks materialised on `bench_device` without a Trainer (a stage
    otherwise builds on CPU when no Trainer gives it a device)."""

    bench_device: torch.device = torch.device("cpu")

    def build_device(self) -> torch.device:
        """Where Stage.build_denoiser materialises the networks: the bench's device."""
        return self.bench_device


class OnDevice(BenchDevice, DMD2):
    """The DMD2 stage on the bench's device (BenchDevice)."""


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
    """The DMD2 stage with the 2b edge dmd2.yaml's settings (see tools/bench/dmd2.py's docstring).
    With a device `mesh` (tools/bench/scale.py) the networks are sharded as in a `fit` run: FSDP2
    over the mesh, fp32 parameters computed in `dtype` by the mixed-precision policy."""
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
        options=StageOptions(
            tokenizer=TokenizerSpec(kind="none"),
            text=TextSpec(encoder="none"),
            sharding=ShardingConfig(checkpointing=checkpointing, compile=compile),
        ),
    )
    stage.bench_device = device
    if mesh is not None:
        stage._device_mesh = mesh
        stage.sharding.param_dtype = str(dtype).removeprefix("torch.")
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


def turn_step(stage: DMD2, optimizers, schedulers, batch: dict, turn: int, student: bool) -> torch.Tensor:
    """DMD2.training_step for one turn of one micro-batch, without the Trainer's plumbing; returns
    the turn's loss (detached, not synchronised)."""
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
    return loss.detach().mean()


def dynamo_graphs() -> int:
    """Graphs Dynamo has compiled in this process so far (a recompile adds one)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


@dataclasses.dataclass
class StageRuns:
    """A stage the bench times, with its optimizers and schedulers: what every configuration
    resets to (`keep_initial`, `reset`) and the losses of the runs of the last measurement."""

    stage: torch.nn.Module
    optimizers: list
    schedulers: list
    losses: list = dataclasses.field(default_factory=list, kw_only=True)
    """The loss of every run since the last measurement began (detached tensors)."""
    initial: dict | None = dataclasses.field(default=None, kw_only=True)
    """Trained parameters, optimizer and scheduler states kept by `keep_initial`."""

    def trained(self) -> list[torch.Tensor]:
        """The parameters the optimizers step."""
        return [p for opt in self.optimizers for group in opt.param_groups for p in group["params"]]

    def keep_initial(self) -> None:
        """Keep a copy of the trained parameters and the optimizer and scheduler states, so that
        `reset` starts every configuration from the same weights (same-seed losses compare)."""
        self.initial = dict(
            params=[p.detach().clone() for p in self.trained()],
            optimizers=[copy.deepcopy(opt.state_dict()) for opt in self.optimizers],
            schedulers=[copy.deepcopy(s.state_dict()) for s in self.schedulers],
        )

    def reset(self) -> None:
        """Back to the state `keep_initial` kept (nothing to do without one)."""
        if self.initial is None:
            return
        with torch.no_grad():
            for p, kept in zip(self.trained(), self.initial["params"], strict=True):
                p.copy_(kept)
        for opt, kept in zip(self.optimizers, self.initial["optimizers"], strict=True):
            opt.load_state_dict(copy.deepcopy(kept))  # load_state_dict keeps same-device tensors as they are
        for sched, kept in zip(self.schedulers, self.initial["schedulers"], strict=True):
            sched.load_state_dict(copy.deepcopy(kept))

    def timed_runs(self, run: Callable[[], None], steps: int, device: torch.device) -> tuple[float, float | None]:
        """Median seconds and peak GiB of `run` (tools.bench.common.timed_peak). Out of GPU
        memory: the gradients are dropped (the next measurement starts clean) and the error
        raised. The losses of the warm-up and timed runs are left in `losses`."""
        self.losses = []
        try:
            return timed_peak(run, steps, device)
        except torch.OutOfMemoryError:
            for opt in self.optimizers:
                opt.zero_grad(set_to_none=True)
            raise


@dataclasses.dataclass
class Turns(StageRuns):
    """A DMD2 stage ready to time its turns: both optimizers' states already exist (as after the
    first turns of training, so each turn's peak memory holds both) and each kind of turn runs at
    its full backward simulation."""

    stage: OnDevice
    numbers: dict[bool, int]
    """{is_student_turn: turn number} (full_simulation_turns)."""

    @classmethod
    def build(cls, preset, device, dtype, checkpointing, compile, student_trainable, mesh=None) -> Turns:
        """The 2b edge dmd2.yaml stage (build_stage) with both optimizers' states created."""
        stage = build_stage(preset, device, dtype, checkpointing, compile, student_trainable, mesh=mesh)
        optimizers, schedulers = stage.configure_optimizers()
        prime_optimizers(optimizers)
        return cls(stage, optimizers, schedulers, full_simulation_turns(stage))

    def step(self, batch: dict, student: bool) -> None:
        loss = turn_step(self.stage, self.optimizers, self.schedulers, batch, self.numbers[student], student)
        self.losses.append(loss)

    def measure(self, batch: dict, student: bool, steps: int, device: torch.device) -> tuple[float, float | None]:
        """Median seconds and peak GiB of one kind of turn (StageRuns.timed_runs)."""
        return self.timed_runs(functools.partial(self.step, batch, student), steps, device)
