"""The KD warmup stage `--mode dmd2` times beside the DMD2 turns ("KD step"): built as the 2b edge
`kd.yaml` recipe sets it up, one optimizer step run as Lightning's automatic optimization runs
KDWarmup.training_step.

The stage is modules.stages.KDWarmup: the student starts from the teacher's preset (base + edge
control branch), all of it trained (`trainable: all`), on the 4-step t-list 1.0, 0.75, 0.5, 0.25
shifted by 5; AdamW at lr 1e-5 with 500 warm-up steps, constant after. Each step calls the stage's
own `loss` (a saved teacher state at a t_k drawn per sample, one student forward with gradient,
modules/distill.py's kd_loss against the teacher's x0). What the Trainer adds under kd.yaml is
re-composed: zero the gradients, backward, clip the gradient norm to 1.0 (`gradient_clip_val`),
AdamW step, scheduler step (interval step). Not included: the EMA update, the non-finite check
and logging. The batch holds precomputed latents (tokenizer `none`, as for the DMD2 turns): a
`fit` of kd.yaml also encodes the KD shards' control pixels with its tokenizer each step.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from modules import flow
from modules.parallel import ShardingConfig
from modules.stages.base import NetSpec, OptimSpec, StageOptions, TextSpec, TokenizerSpec
from modules.stages.kd_warmup import KDWarmup
from tools.bench.dmd2_stage import BenchDevice, StageRuns, cast_inputs, dynamo_graphs, prime_optimizers

KD_GRADIENT_CLIP = 1.0
"""kd.yaml's trainer.gradient_clip_val (the Trainer clips the gradient norm of every step)."""


class KDOnDevice(BenchDevice, KDWarmup):
    """The KD warmup stage on the bench's device (BenchDevice)."""


def build_kd_stage(
    preset: str, device: torch.device, dtype: torch.dtype, checkpointing: str, compile: bool
) -> KDOnDevice:
    """The KD warmup stage with the 2b edge kd.yaml's settings (see the module docstring), its
    student in `dtype` on `device`."""
    stage = KDOnDevice(
        student=NetSpec(preset=preset, overrides={"text_proj_in": None}),
        modality="edge",
        t_list=(1.0, 0.75, 0.5, 0.25),
        t_shift=5.0,
        trainable="all",
        optim=OptimSpec(lr=1e-5, warmup_steps=500, schedule="constant"),
        options=StageOptions(
            tokenizer=TokenizerSpec(kind="none"),
            text=TextSpec(encoder="none"),
            sharding=ShardingConfig(checkpointing=checkpointing, compile=compile),
        ),
    )
    stage.bench_device = device
    stage.configure_model()  # builds in float32 (init_weights draws float32), then one cast
    stage.to(dtype)
    if dtype != torch.float32:
        cast_inputs(stage.model, dtype)
    return stage


def kd_batch(stage: KDWarmup, batch: dict, seed: int = 0) -> dict:
    """`batch` (tools.bench.common.stage_batch: latents, control latents, text) as a batch of KD
    shards (datamodules/video.py, `use_kd`): `latent` stands for the teacher's clean latent x0,
    `kd_noise` for its noise at t = 1, and `kd_states` (B, K, C, T, H, W) for its states at the
    student's K times `kd_t` (B, K), taken on the straight path between the two (a teacher's
    trajectory passes near it); the step's cost does not depend on the values."""
    x0 = batch["latent"]
    g = torch.Generator(device=x0.device).manual_seed(seed)
    noise = torch.randn(x0.shape, generator=g, device=x0.device, dtype=x0.dtype)
    states = torch.stack([flow.add_noise(x0, noise, t) for t in stage.times], dim=1)
    times = torch.tensor(stage.times, device=x0.device).expand(len(x0), -1)
    return batch | dict(kd_noise=noise, kd_states=states, kd_t=times)


def kd_step(stage: KDWarmup, optimizer, scheduler, batch: dict, step: int) -> torch.Tensor:
    """One optimizer step of KDWarmup at global step `step` without the Trainer's plumbing (one
    micro-batch: kd.yaml accumulates none); returns the loss (detached, not synchronised)."""
    optimizer.zero_grad(set_to_none=True)
    loss = stage.loss(batch, step)  # what KDWarmup.training_step computes and logs
    loss.backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    torch.nn.utils.clip_grad_norm_(params, KD_GRADIENT_CLIP)  # what Lightning's clip_gradients calls
    optimizer.step()
    scheduler.step()
    return loss.detach()


@dataclasses.dataclass
class KDSteps(StageRuns):
    """A KD warmup stage ready to time its optimizer step: the student's AdamW state already
    exists (as after the first step of training, so the step's peak memory holds it). Steps are
    numbered as the Trainer's global step from 0 after each `reset` (the t_k each sample draws
    depends on it), so every configuration runs the same sequence of steps."""

    stage: KDOnDevice
    number: int = 0
    """The global step of the next run."""
    graphs: list[int] = dataclasses.field(default_factory=list)
    """Dynamo's graph count after each run of the last measurement (warm-up first)."""

    @classmethod
    def build(cls, preset, device, dtype, checkpointing, compile) -> KDSteps:
        """The 2b edge kd.yaml stage (build_kd_stage) with its optimizer's state created."""
        stage = build_kd_stage(preset, device, dtype, checkpointing, compile)
        conf = stage.configure_optimizers()
        optimizer, scheduler = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
        prime_optimizers([optimizer])
        return cls(stage, [optimizer], [scheduler])

    def step(self, batch: dict) -> None:
        """One optimizer step (kd_step) at the next global step; its loss and the graph count kept."""
        self.losses.append(kd_step(self.stage, self.optimizers[0], self.schedulers[0], batch, self.number))
        self.number += 1
        self.graphs.append(dynamo_graphs())

    def reset(self) -> None:
        """Back to the kept state (StageRuns.reset) and to global step 0."""
        super().reset()
        self.number = 0

    def measure(self, batch: dict, steps: int, device: torch.device) -> tuple[float, float | None]:
        """Median seconds and peak GiB of the optimizer step (StageRuns.timed_runs)."""
        self.graphs = []
        return self.timed_runs(functools.partial(self.step, batch), steps, device)

    def trainable_params(self) -> int:
        """Parameters the step trains (kd.yaml's `trainable: all`: the whole student)."""
        return sum(p.numel() for p in self.trained())
