"""DMD2: distribution-matching distillation of the controlled teacher into a few-step student.

Four networks, each sharded by modules/parallel.py: the student (from the KD warmup), the frozen
teacher (the real score, with CFG in Cosmos's form against a negative prompt), the fake score
(from the teacher, tracks the student's distribution) and a GAN head on intermediate features of
the fake score (default) or of the teacher (Cosmos-Transfer1's choice).

One optimizer step per turn (manual optimization): a student turn steps the student's optimizer,
a critic turn the critics' (fake score + GAN head), so `global_step` counts turns; turn n is a
student turn when n % student_update_freq == 0 (DMD2's two time-scale rule). `micro_batches`
consecutive batches make one turn (gradient accumulation within a turn). The loss math is
modules/distill.py's, the very functions the 2-D toy test proves (tests/test_toy.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .. import distill, flow
from ..denoiser import Cond, Denoiser, null_text
from ..nets.gan import GANHead, GANHeadConfig
from ..parallel import shard_head
from ..sampling import SamplerConfig, guided
from .base import (
    NetSpec,
    OptimSpec,
    Stage,
    StageOptions,
    adamw,
    allow_in_checkpoints,
    check_trainable,
    cond_frame_mask,
    draw_cond_frames,
    sample_generator,
)


@dataclass
class CriticTime:
    """Noise levels of the DMD gradient, the fake-score loss and the GAN branches
    (`distill.critic_times`: uniform in the unshifted variable, then shifted)."""

    shift: float = 5.0
    t_min: float = 0.02
    t_max: float = 0.98


@dataclass
class GANSpec:
    """The discriminator: a head on trunk features; weight 0 switches the GAN terms off."""

    weight: float = 1e-3
    """Weight of the student's GAN loss next to the DMD loss."""
    critic_weight: float = 1e-2
    """Weight of the discriminator loss next to the fake-score loss on critic turns."""
    features: str = "fake_score"
    """Whose trunk the head reads: fake_score (trained with the head, DMD2) or teacher (frozen, Transfer1)."""
    taps: tuple[int, ...] = (1,)
    """Trunk blocks whose outputs the head reads."""
    hidden: int = 256


allow_in_checkpoints(CriticTime, GANSpec)


class DMD2(Stage):
    def __init__(
        self,
        teacher: NetSpec,
        student: NetSpec | None = None,
        fake_score: NetSpec | None = None,
        modality: str | None = "edge",
        t_list: tuple[float, ...] = flow.STUDENT_T_LIST,
        t_shift: float = 5.0,
        student_trainable: str = "all",
        guidance: float = 3.0,
        negative_prompt: str | None = None,
        student_update_freq: int = 5,
        critic_time: CriticTime = CriticTime(),
        gan: GANSpec = GANSpec(),
        student_optim: OptimSpec = OptimSpec(lr=1e-6),
        critic_optim: OptimSpec = OptimSpec(lr=2e-7),
        micro_batches: int = 1,
        gradient_clip: float | None = 1.0,
        max_cond_frames: int = 0,
        options: StageOptions = StageOptions(),
    ):
        """
        Args:
            teacher: the teacher's directory (`init_from`): frozen, the real score.
            student: where the student starts (the KD warmup's export); none: the teacher.
            fake_score: where the fake score starts; none: the teacher.
            modality: the control branch all networks use (the teacher's); none for a base.
            t_list: the student's times before `t_shift`.
            t_shift: shift of the t-list.
            student_trainable: all (base + control) or control (the control branch only: about
                a tenth of the student's optimizer memory at 2B).
            guidance: the teacher's CFG weight (Cosmos's form, pred = cond + g (cond - uncond)).
            negative_prompt: the teacher's unconditional prompt; none: the null text (zeros).
            student_update_freq: a student turn every this many turns, critic turns between.
            critic_time: noise levels of the critic and of the DMD gradient.
            gan: the discriminator head and the GAN loss weights.
            student_optim: AdamW of the student.
            critic_optim: AdamW of the fake score and the GAN head.
            micro_batches: batches accumulated into one turn.
            gradient_clip: global gradient-norm clip of each optimizer step; none: off.
                (Trainer.gradient_clip_val does not apply: the stage steps its optimizers itself.)
            max_cond_frames: each sample gets 0..K leading clean latent frames of its real clip as
                conditioning for every network (chunk chaining); they are masked out of every loss.
            options: what every stage shares (StageOptions): tokenizer, text encoder, sharding,
                validation sampler, EMA, export directory, seed, non-finite stop.
        """
        super().__init__(options, student_optim, SamplerConfig(sampler="student"))
        check_trainable(student_trainable, "student_trainable")
        if gan.features not in ("fake_score", "teacher"):
            raise ValueError(f"gan.features must be fake_score or teacher, got {gan.features!r}")
        if micro_batches < 1 or student_update_freq < 1:
            raise ValueError("micro_batches and student_update_freq must be >= 1")
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.specs = {"teacher": teacher, "student": student or teacher, "fake_score": fake_score or teacher}
        self.modality, self.student_trainable = modality, student_trainable
        self.times = flow.student_t_list(t_list, t_shift)
        self.guidance, self.negative_prompt, self.freq = guidance, negative_prompt, student_update_freq
        self.critic_time, self.gan, self.critic_optim = critic_time, gan, critic_optim
        self.micro_batches, self.gradient_clip, self.max_cond_frames = micro_batches, gradient_clip, max_cond_frames
        if self.sampler.sampler == "student":  # validation samples run the student on its own t-list
            self.sampler = replace(self.sampler, t_list=tuple(t_list), shift=t_shift)
        self.student = self.teacher = self.fake_score = self.gan_head = None
        self._neg: tuple[torch.Tensor, torch.Tensor] | None = None

    # --- networks -------------------------------------------------------------------------------

    def configure_model(self) -> None:
        if self.student is not None:
            return
        mods = [self.modality] if self.modality else []
        self.teacher = self.build_denoiser(self.specs["teacher"], mods, None)
        self.student = self.build_denoiser(self.specs["student"], mods, self.student_trainable)
        self.fake_score = self.build_denoiser(self.specs["fake_score"], mods, "all")
        if self.gan.weight or self.gan.critic_weight:
            dim, depth = self.teacher.cfg.dit.dim, self.teacher.cfg.dit.depth
            if any(not 0 <= i < depth for i in self.gan.taps):
                raise ValueError(f"gan.taps {list(self.gan.taps)} must be blocks of the {depth}-block trunk")
            cfg = GANHeadConfig(dim=dim, taps=sorted(set(self.gan.taps)), hidden=self.gan.hidden)
            with torch.device("meta"):
                head = GANHead(cfg)
            shard_head(head, self.mesh(), self.sharding)
            head.to_empty(device=self.build_device())
            self.gan_head = head.init_weights(self.seed + 1)
        self.track_ema(self.student)

    def trained_model(self) -> Denoiser:
        return self.student

    def critic_parameters(self) -> list[torch.nn.Parameter]:
        params = list(self.fake_score.parameters())
        return params + (list(self.gan_head.parameters()) if self.gan_head is not None else [])

    def configure_optimizers(self):
        s_opt, s_sched = adamw([p for p in self.student.parameters() if p.requires_grad], self.optim_spec)
        c_opt, c_sched = adamw(self.critic_parameters(), self.critic_optim)
        return [s_opt, c_opt], [s_sched, c_sched]

    # --- one turn --------------------------------------------------------------------------------

    def negative(self, text: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's unconditional text: the negative prompt, or the null text."""
        if self.negative_prompt is None:
            return null_text(text, mask)
        if self._neg is None:
            if self.text_encoder is None:
                raise ValueError("negative_prompt needs a text encoder (text.encoder is none)")
            emb, m = self.text_encoder.encode([self.negative_prompt])
            self._neg = emb.to(self.device).float(), m.to(self.device)
        emb, m = self._neg
        if emb.shape[1:] != text.shape[1:]:
            raise ValueError(
                f"negative prompt embeddings {tuple(emb.shape[1:])} do not match the batch's {tuple(text.shape[1:])}"
            )
        return emb.expand(len(text), -1, -1), m.expand(len(text), -1)

    def draws(self, x0: torch.Tensor, turn: int, micro: int) -> dict[str, torch.Tensor]:
        """Per-sample noise and critic times from each sample's own stream."""
        B = len(x0)
        T = x0.shape[2]
        out = {k: [] for k in ("noise", "eps", "t", "eps_data", "t_data", "k")}
        for i in range(B):
            g = sample_generator(self.seed, turn, self.sample_index(i, B, micro), x0.device)
            for k in ("noise", "eps", "eps_data"):
                out[k].append(torch.randn(x0.shape[1:], generator=g, device=x0.device))
            for k in ("t", "t_data"):
                out[k].append(
                    distill.critic_times(
                        1, self.critic_time.shift, g, self.critic_time.t_min, self.critic_time.t_max, device=x0.device
                    )
                )
            out["k"].append(draw_cond_frames(self.max_cond_frames, T, g))
        counts = out.pop("k")
        d = {k: torch.stack(v) if k.startswith(("noise", "eps")) else torch.cat(v) for k, v in out.items()}
        d["frames"] = cond_frame_mask(counts, T)  # (B, T) conditioning
        return d

    def student_sample(self, cond: Cond, noise: torch.Tensor, turn: int, micro: int) -> torch.Tensor:
        """x0_gen: backward simulation to this turn's exit step (the same on every rank), then
        the student's prediction there (with grad on student turns)."""
        exit_step = distill.choose_exit_step(len(self.times), turn, self.seed)
        # the re-noising of the simulated steps: one stream per (turn, micro-batch, rank)
        rank, world = self.data_rank()  # a context-parallel group shares one stream
        g = sample_generator(self.seed, turn, -1 - (micro * world + rank), noise.device)
        x_t, t = distill.backward_simulation(guided(self.student, cond, 0.0), noise, self.times, exit_step, g)
        return self.student.denoise(x_t, t, cond)

    def disc_fn(self, cond: Cond):
        """logits(x_t, t): the GAN head on the trunk features `gan.features` names.

        On the fake score (DMD2, Yin et al. 2024, Sec. 4.2) the discriminator loss also trains
        the fake score's trunk; on the frozen teacher (Cosmos-Transfer1's choice) the head alone
        learns, and the generator loss reaches the student through the teacher's activations
        while the teacher's weights, which require no grad, get none."""
        if self.gan_head is None:
            return None
        trunk = self.fake_score if self.gan.features == "fake_score" else self.teacher
        return lambda x, t: self.gan_head(trunk.features(x, t, cond, tuple(sorted(set(self.gan.taps)))))

    def turn_inputs(self, batch: dict, turn: int, micro: int) -> tuple[torch.Tensor, Cond, dict[str, torch.Tensor]]:
        """The real latents, the conditioning every network of the turn sees and the turn's draws.

        A batch `mask` (shards' mask.mp4, white = control applies) weights the control where it is
        given, as a spec's mask_path does in inference (`control_weights`, pooled to the token
        grid by `mix_residuals`); without one the control applies everywhere, as before."""
        x0_data = self.latents(batch, "video")
        text, mask = self.text(batch)
        neg, neg_mask = self.negative(text, mask)
        controls = {self.modality: self.latents(batch, "control")} if self.modality else {}
        weights = {self.modality: batch["mask"].float()} if self.modality and "mask" in batch else {}
        d = self.draws(x0_data, turn, micro)
        frames = d["frames"] if self.max_cond_frames else None
        cond = Cond(
            text=text,
            text_mask=mask,
            neg_text=neg,
            neg_text_mask=neg_mask,
            controls=controls,
            control_weights=weights,
            cond_latents=x0_data if frames is not None else None,
            cond_frames=frames,
            fps=self.fps(batch),
        )
        return x0_data, cond, d

    def turn_loss(self, batch: dict, turn: int, micro: int, student: bool) -> tuple[torch.Tensor, dict]:
        x0_data, cond, d = self.turn_inputs(batch, turn, micro)
        frames = cond.cond_frames
        keep = None if frames is None else (~frames)[:, None, :, None, None]
        if student:
            x0_gen = self.student_sample(cond, d["noise"], turn, micro)
            return distill.generator_turn_loss(
                x0_gen,
                d["t"],
                d["eps"],
                guided(self.teacher, cond, self.guidance),
                guided(self.fake_score, cond, 0.0),
                self.disc_fn(cond),
                mask=keep,
                gan_weight=self.gan.weight,
            )
        with torch.no_grad():
            x0_gen = self.student_sample(cond, d["noise"], turn, micro)
        return distill.critic_turn_loss(
            x0_gen,
            d["t"],
            d["eps"],
            guided(self.fake_score, cond, 0.0),
            self.disc_fn(cond) if self.gan.critic_weight else None,
            x0_data,
            d["t_data"],
            d["eps_data"],
            mask=keep,
            disc_weight=self.gan.critic_weight,
        )

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        turn, micro = self.global_step, batch_idx % self.micro_batches
        is_student = distill.student_turn(turn, self.freq)
        opts, scheds = self.optimizers(), self.lr_schedulers()
        if micro == 0:  # the other turn's backward may have left gradients on these parameters
            for opt in opts:
                opt.zero_grad(set_to_none=True)
        loss, parts = self.turn_loss(batch, turn, micro, is_student)
        self.manual_backward(loss.mean() / self.micro_batches)
        self.log_turn(is_student, loss, parts)
        self.log_skipped(batch)
        self._stepped_student = False
        if micro == self.micro_batches - 1:
            i = 0 if is_student else 1
            if self.gradient_clip:
                self.clip_gradients(opts[i], gradient_clip_val=self.gradient_clip, gradient_clip_algorithm="norm")
            opts[i].step()  # Stage.on_before_optimizer_step drops non-finite gradients first (a skipped turn)
            scheds[i].step()
            self._stepped_student = is_student and not self._skipped_step
            if self.ema is not None and self._stepped_student:  # before checkpoint callbacks (Stage.optimizer_step)
                self.ema.update(self.student)
        return loss.detach().mean()

    def log_turn(self, is_student: bool, loss: torch.Tensor, parts: dict[str, torch.Tensor]) -> None:
        """The turn's loss parts as train/student_<part> or train/critic_<part>, averaged over the
        ranks (as sync_dist does), written at this turn's step only: every student turn, and a
        critic turn at the trainer's log_every_n_steps. Through `self.log` a key keeps its last
        value until the data epoch ends and is written again at every later logging step, so the
        student's losses repeated on the critic turns (and logging every n steps skipped student
        turns altogether). The progress bar shows the turn's loss (student_loss / critic_loss)."""
        who = "student" if is_student else "critic"
        self.log(f"{who}_loss", loss.detach().mean(), prog_bar=True, logger=False)
        values = torch.stack([v.mean() for v in parts.values()])
        values = self.trainer.strategy.reduce(values, reduce_op="mean")  # every turn, on every rank
        step, every = self.trainer.fit_loop.epoch_loop._batches_that_stepped, self.trainer.log_every_n_steps
        if every and (is_student or (step + 1) % every == 0):
            metrics = {f"train/{who}_{k}": float(v) for k, v in zip(parts, values.tolist())}
            for logger in self.loggers:
                logger.log_metrics(metrics, step=step)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """The fake score's loss on fresh student samples: how far the critic lags the student."""
        loss, _ = self.turn_loss(batch, -1 - batch_idx, 0, student=False)
        self.log("val/fake_score_loss", loss.mean(), sync_dist=True)
