"""KDWarmup: the student learns to jump from the teacher's trajectory straight to its end.

The student starts as a copy of the teacher (base + control branch). From KD shards
(`vidistill make-kd-data`) it regresses the teacher's clean latent x0 from a saved state: for a
1-step student from the pure noise at t = 1, for a multi-step student from the teacher's state at
a t_k of its t-list drawn per sample (Cosmos-Transfer1's KD warmup; DMD2 then refines it).
Converted Cosmos-Transfer1 KD shards hold the noise and the teacher's decoded video, no x0: the
video is encoded on the fly by the recipe's tokenizer (`KDWarmup.target`).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .. import flow
from ..denoiser import Cond
from ..distill import kd_loss
from ..sampling import SamplerConfig
from .base import NetSpec, OptimSpec, Stage, StageOptions, check_trainable, sample_generator


class KDWarmup(Stage):
    def __init__(
        self,
        student: NetSpec,
        modality: str | None = "edge",
        t_list: tuple[float, ...] = flow.STUDENT_T_LIST,
        t_shift: float = 5.0,
        trainable: str = "all",
        optim: OptimSpec = OptimSpec(lr=1e-5),
        options: StageOptions = StageOptions(),
    ):
        """
        Args:
            student: the network to start from: the teacher's directory in `init_from`.
            modality: the control branch the student keeps (the teacher's); none for a base.
            t_list: the student's times before `t_shift`; one entry is a 1-step student. Must
                be the t-list the KD data was made for (checked against each batch).
            t_shift: shift of the t-list.
            trainable: all (base + control) or control (the control branch only).
            optim: AdamW and its schedule.
            options: what every stage shares (StageOptions): tokenizer, text encoder, sharding,
                validation sampler, EMA, export directory, seed, non-finite stop.
        """
        super().__init__(options, optim, SamplerConfig(sampler="student"))
        check_trainable(trainable)
        if not t_list:
            raise ValueError("t_list needs at least one time")
        self.save_hyperparameters()
        self.student_spec, self.modality, self.trainable = student, modality, trainable
        self.times = flow.student_t_list(t_list, t_shift)
        if self.sampler.sampler == "student":  # validation samples run the student on its own t-list
            self.sampler = replace(self.sampler, t_list=tuple(t_list), shift=t_shift)
        self.model = None

    def configure_model(self) -> None:
        if self.model is not None:
            return
        self.model = self.build_denoiser(self.student_spec, [self.modality] if self.modality else [], self.trainable)
        self.track_ema(self.model)

    def inputs(self, batch: dict, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The student's input state and its time per sample: pure noise at t = 1 for a 1-step
        student, else the teacher's saved state at a t_k drawn from each sample's own stream."""
        noise = batch["kd_noise"].float()
        B = len(noise)
        if len(self.times) == 1:
            if self.times[0] != 1.0:
                raise ValueError(f"a 1-step student starts from noise at t = 1, not {self.times[0]}")
            return noise, noise.new_ones(B)
        if "kd_states" not in batch:
            raise ValueError(
                "a multi-step student needs KD data with teacher states (make-kd-data); "
                "these shards hold the noise only"
            )
        t_all = batch["kd_t"].float()
        if t_all.shape[1] != len(self.times) or not torch.allclose(t_all[0].cpu(), torch.tensor(self.times), atol=1e-5):
            raise ValueError(
                f"the KD data holds states at t = {t_all[0].tolist()}, the student's t-list is "
                f"{list(self.times)}: remake the data or fix t_list / t_shift"
            )
        ks = []
        for i in range(B):  # each sample's own stream, as in every stage (accumulation included)
            g = sample_generator(self.seed, step, self.sample_index(i, B, micro), noise.device)
            ks.append(int(torch.randint(len(self.times), (1,), generator=g, device=noise.device)))
        idx = torch.arange(B, device=noise.device)
        k = torch.tensor(ks, device=noise.device)
        return batch["kd_states"].float()[idx, k], t_all[idx, k]

    def loss(self, batch: dict, step: int, micro: int = 0) -> torch.Tensor:
        """0.5 * MSE(student x0 from the saved state, teacher x0), averaged over the batch;
        `micro` is the accumulation micro-batch of the optimizer step (Stage.sample_index)."""
        x_t, t = self.inputs(batch, step, micro)
        x0_teacher = self.target(batch, x_t)  # checked against the noise before any network work
        text, mask = self.text(batch)
        controls = {self.modality: self.latents(batch, "control")} if self.modality else {}
        cond = Cond(text=text, text_mask=mask, controls=controls, fps=self.fps(batch))
        x0 = self.model.denoise(x_t, t, cond)
        return kd_loss(x0, x0_teacher).mean()

    def target(self, batch: dict, x_t: torch.Tensor) -> torch.Tensor:
        """The teacher's clean latent: make-kd-data's x0 (`latent`), or the teacher's video encoded
        now by the recipe's tokenizer, for KD data that holds the noise and the decoded video only
        (converted Cosmos-Transfer1 shards, `make-shards --transfer1_kd`). The noise was drawn in
        its teacher's latent space, so the tokenizer must give latents of the noise's shape."""
        x0 = self.latents(batch, "video")
        if x0.shape != x_t.shape:
            raise ValueError(
                f"the KD noise is {tuple(x_t.shape[1:])} (C, T, H, W) and the teacher's video encodes to "
                f"{tuple(x0.shape[1:])} with tokenizer {self.tok_spec.kind!r}: use the tokenizer "
                "the KD data's teacher sampled in, and num_frames / height / width of its videos"
            )
        return x0

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.log("val/loss", self.loss(batch, step=-1 - batch_idx), prog_bar=True, sync_dist=True)
