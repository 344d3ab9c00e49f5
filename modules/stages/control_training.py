"""ControlTraining: base control training (Cosmos-Transfer2.5's first stage).

A frozen base with a trainable VACE control branch for one modality, trained with the
rectified-flow loss; with `trainable: all` and no modality the same module trains a base from
scratch (the embedded default needs one). Random 0..K leading latent frames are given clean as conditioning
(so generated chunks can be chained) and left out of the loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import flow
from ..denoiser import Cond, drop_text
from ..sampling import SamplerConfig
from .base import (
    NetSpec,
    OptimSpec,
    Stage,
    StageOptions,
    allow_in_checkpoints,
    check_trainable,
    cond_frame_mask,
    draw_cond_frames,
    sample_generator,
)


@dataclass
class TimeSpec:
    """Training-time sampling of t (modules/flow.py sample_t)."""

    kind: str = "logit_normal"
    """logit_normal or uniform."""
    mean: float = 0.0
    std: float = 1.0
    shift: float = 1.0
    """Shift s applied after sampling: t -> s t / (1 + (s - 1) t)."""
    t_min: float = 1e-3
    """Lower clamp: the velocity loss divides by t."""


allow_in_checkpoints(TimeSpec)


class ControlTraining(Stage):
    def __init__(
        self,
        net: NetSpec = NetSpec(),
        modality: str | None = "edge",
        trainable: str = "control",
        time: TimeSpec = TimeSpec(),
        max_cond_frames: int = 2,
        optim: OptimSpec = OptimSpec(),
        options: StageOptions = StageOptions(),
    ):
        """
        Args:
            net: the network (preset or a saved Denoiser directory to start from).
            modality: the control trained in this run (edge, blur, depth, seg, keypoint); none trains a
                plain base (no control branch).
            trainable: control (frozen base, the control branch trained) or all (every weight: the base
                from scratch when modality is none). The vocabulary of every stage; "base", its old
                spelling here, means all with no modality.
            time: training-time sampling.
            max_cond_frames: each sample gets 0..K leading clean conditioning latent frames.
            optim: AdamW and its learning-rate schedule.
            options: what every stage shares (StageOptions): tokenizer, text encoder, sharding,
                validation sampler, EMA, export directory, seed, non-finite stop.
        """
        super().__init__(options, optim, SamplerConfig(steps=20, guidance=0.0))
        if trainable == "base":
            trainable, modality = "all", None
        check_trainable(trainable)
        if trainable == "control" and not modality:
            raise ValueError("control training needs a modality (edge, blur, depth, seg, keypoint)")
        self.save_hyperparameters()
        self.net_spec, self.trainable, self.time, self.max_cond_frames = net, trainable, time, max_cond_frames
        self.modality = modality
        self.model = None

    def configure_model(self) -> None:
        if self.model is not None:
            return
        modalities = [self.modality] if self.modality else []
        self.model = self.build_denoiser(self.net_spec, modalities, self.trainable)
        self.track_ema(self.model)

    # --- the loss -------------------------------------------------------------------------------

    def draws(self, x0: torch.Tensor, step: int, micro: int = 0):
        """Per-sample noise, time, conditioning-frame count and text dropout, drawn from each
        sample's own stream (the same on any number of ranks and accumulation steps)."""
        B, _, T = x0.shape[:3]
        eps, t, k, drop = [], [], [], []
        for i in range(B):
            g = sample_generator(self.seed, step, self.sample_index(i, B, micro), x0.device)
            eps.append(torch.randn(x0.shape[1:], generator=g, device=x0.device))
            t.append(
                flow.sample_t(
                    1,
                    self.time.kind,
                    self.time.mean,
                    self.time.std,
                    self.time.shift,
                    t_min=self.time.t_min,
                    generator=g,
                    device=x0.device,
                )
            )
            k.append(draw_cond_frames(self.max_cond_frames, T, g))
            drop.append(torch.rand(1, generator=g, device=x0.device) < self.text_spec.dropout)
        frames = cond_frame_mask(k, T)
        return torch.stack(eps), torch.cat(t), frames, torch.cat(drop)

    def loss(self, batch: dict, step: int, micro: int = 0, train: bool = True) -> torch.Tensor:
        """Mean over samples of the per-sample flow loss on non-conditioning frames."""
        x0 = self.latents(batch, "video")
        text, mask = self.text(batch)
        eps, t, frames, drop = self.draws(x0, step, micro)
        if train:
            text, mask = drop_text(text, mask, drop)
        controls = {self.modality: self.latents(batch, "control")} if self.modality else {}
        # a shard's mask.mp4 (white = control applies) weights the control, as mask_path does in inference
        weights = {self.modality: batch["mask"].float()} if self.modality and "mask" in batch else {}
        x_t = flow.add_noise(x0, eps, t)
        cond = Cond(
            text=text,
            text_mask=mask,
            controls=controls,
            control_weights=weights,
            cond_latents=x0,
            cond_frames=frames,
            fps=self.fps(batch),
        )
        x0_pred = self.model.denoise(x_t, t, cond)
        keep = (~frames)[:, None, :, None, None]
        return flow.velocity_loss(x0_pred, x0, x_t, t, keep).mean()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        # a fixed random stream per validation batch, different from every training step's
        loss = self.loss(batch, step=-1 - batch_idx, train=False)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
