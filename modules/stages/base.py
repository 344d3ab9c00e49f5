"""What every training stage shares: building sharded networks, turning batches into latents and
text conditions, per-sample random streams, the optimizer and its schedule, and exporting the
trained network. The stages (control_training.py, kd_warmup.py, dmd2.py beside this file)
subclass `Stage`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.tensor import DTensor

from datamodules.files import written
from datamodules.seeds import mix_seed

from ..checkpoint import checkpoint_path, save_atomic
from ..denoiser import Cond, Denoiser, null_text
from ..nets import ControlConfig, NetConfig, SparseAttention, preset
from ..parallel import ShardingConfig, context_group, data_parallel_rank, shard_mesh, shard_model
from ..sampling import GenerationSettings, Sampler, SamplerConfig, to_uint8, to_unit
from ..text import build_text_encoder
from ..tokenizer import build_tokenizer
from .ema import EMAWeights


@dataclass
class NetSpec:
    """Which network to build: a preset (with overrides) or a saved Denoiser directory."""

    preset: str = "tiny"
    """tiny, small, 2b or 14b (modules/nets/presets.py)."""
    init_from: str | None = None
    """Directory written by import-weights / export / consolidate; its config wins over `preset`."""
    overrides: dict = field(default_factory=dict)
    """Fields to override on the preset: DiTConfig's (e.g. {dim: 128, text_proj_in: null}) and
    NetConfig's cond_frame_t, use_text_mask, prediction."""
    control: dict = field(default_factory=dict)
    """ControlConfig fields of the control branches (blocks, every, channels), over the preset's
    or `init_from`'s: a branch's size is chosen where it is trained. A saved network whose
    branches exist already keeps theirs (a different value is an error)."""
    sparse: dict = field(default_factory=dict)
    """Sparse self-attention (modules/nets/sparse.py SparseAttention fields: mode, tile, window,
    keep) over the preset's or `init_from`'s network, e.g. a sparse student started from a dense
    teacher: the same weights, only the attention changes. Empty: the network's own."""


@dataclass
class TokenizerSpec:
    kind: str = "pixel"
    """pixel (lossless, no weights), cosmos-jit, wan2.1, or none (batches carry precomputed
    latents; no sample videos can be decoded)."""
    path: str | None = None
    """Local directory of the tokenizer weights (cosmos-jit, wan2.1)."""
    options: dict = field(default_factory=lambda: {"spatial": 4})
    """Extra constructor arguments (pixel: spatial, temporal; wan2.1: dtype, tiling)."""


@dataclass
class TextSpec:
    encoder: str = "tiny"
    """tiny (seeded T5, no download), a local transformers directory, or none (batches carry
    precomputed `text_emb`)."""
    max_length: int = 64
    """Prompts are padded / truncated to this many tokens."""
    dropout: float = 0.1
    """Probability of training a sample on the null text (zeros), which CFG's unconditional uses."""


@dataclass
class OptimSpec:
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 100
    """Linear warm-up from 0 over this many optimizer steps."""
    schedule: str = "constant"
    """After warm-up: constant or cosine (to min_lr_ratio x lr at total_steps)."""
    total_steps: int = 10_000
    min_lr_ratio: float = 0.1


@dataclass
class StageOptions:
    """What every stage takes besides its networks, losses and optimizers (recipes: `options:`)."""

    tokenizer: TokenizerSpec = field(default_factory=TokenizerSpec)
    """The video tokenizer: encodes clips (batches may carry latents instead) and decodes samples."""
    text: TextSpec = field(default_factory=TextSpec)
    """The text encoder (batches may carry embeddings instead) and the text dropout."""
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    """FSDP2 mixed precision, activation checkpointing and compilation of every network."""
    sampler: SamplerConfig | None = None
    """How validation sample videos are generated; None: the stage's default (control training:
    Euler, 20 steps, no CFG; KD and DMD2: the student's own t-list)."""
    ema_decay: float | None = None
    """Keep an exponential moving average of the trained weights (e.g. 0.999); None: off."""
    export_to: str | None = None
    """Directory the trained network (its EMA if kept) is written to at the end of fit."""
    seed: int = 0
    """Weight init and every per-sample random draw."""
    max_nonfinite_steps: int | None = 5
    """Skipped steps in a row (non-finite loss or gradient on any rank) after which the run
    checkpoints and stops; None: skip forever. 5 rides out a few bad batches in a row but stops a
    diverged run within minutes."""

    def __post_init__(self) -> None:
        if self.max_nonfinite_steps is not None and self.max_nonfinite_steps < 1:
            raise ValueError(f"max_nonfinite_steps must be >= 1 or None, got {self.max_nonfinite_steps}")


OPTIONS = tuple(f.name for f in fields(StageOptions))
"""The StageOptions fields: flat keys of the stages' init arguments before they were grouped."""


def allow_in_checkpoints(*classes: type) -> None:
    """Config dataclasses are saved as hyperparameters; let torch.load(weights_only=True) read them."""
    torch.serialization.add_safe_globals(list(classes))


allow_in_checkpoints(NetSpec, TokenizerSpec, TextSpec, OptimSpec, ShardingConfig, SamplerConfig, StageOptions)


def lr_lambda(spec: OptimSpec):
    def fn(step: int) -> float:
        if step < spec.warmup_steps:
            return (step + 1) / spec.warmup_steps
        if spec.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - spec.warmup_steps) / max(1, spec.total_steps - spec.warmup_steps))
        return spec.min_lr_ratio + (1 - spec.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    if spec.schedule not in ("constant", "cosine"):
        raise ValueError(f"optim.schedule must be constant or cosine, got {spec.schedule!r}")
    return fn


TRAINABLE = ("control", "all")
"""What a stage trains of a network: its control branches only, or every weight."""


def check_trainable(value: str, name: str = "trainable") -> None:
    if value not in TRAINABLE:
        raise ValueError(f"{name} must be control or all, got {value!r}")


def control_config(cfg: NetConfig, spec: NetSpec) -> ControlConfig:
    """`cfg.control` with `spec.control`'s fields; refused where `spec.init_from` already holds
    control branches of another size (their weights would not fit)."""
    unknown = sorted(set(spec.control) - {f.name for f in fields(ControlConfig)})
    if unknown:
        raise ValueError(f"net.control: unknown field(s) {', '.join(unknown)}; known: blocks, every, channels")
    ctrl = replace(cfg.control, **spec.control)
    if spec.init_from and cfg.modalities and ctrl != cfg.control:
        raise ValueError(
            f"net.control {spec.control} differs from the control branches {spec.init_from} holds "
            f"({asdict(cfg.control)}, {', '.join(cfg.modalities)}): leave net.control out"
        )
    return ctrl


def adamw(params: list[torch.nn.Parameter], spec: OptimSpec):
    """AdamW over `params` and its per-step learning-rate schedule (`lr_lambda`)."""
    opt = torch.optim.AdamW(params, lr=spec.lr, betas=tuple(spec.betas), weight_decay=spec.weight_decay)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(spec))


def draw_cond_frames(max_cond_frames: int, frames: int, generator: torch.Generator) -> torch.Tensor:
    """One sample's number of leading clean conditioning latent frames, uniform in
    0..min(max_cond_frames, frames - 1) (at least one frame is always generated); (1,) long."""
    hi = min(max_cond_frames, frames - 1) + 1
    return torch.randint(0, hi, (1,), generator=generator, device=generator.device)


def cond_frame_mask(counts: list[torch.Tensor], frames: int) -> torch.Tensor:
    """(B, T) bool, True on each sample's leading conditioning frames (`draw_cond_frames`)."""
    k = torch.cat(counts)
    return torch.arange(frames, device=k.device)[None] < k[:, None]


def sample_generator(seed: int, step: int, index: int, device: torch.device) -> torch.Generator:
    """The random stream of one training sample: a function of (seed, step, global sample index)
    only, so a resumed run and a run on any number of ranks draw the same numbers."""
    return torch.Generator(device=device).manual_seed(mix_seed(seed, step, index))


class NonFiniteError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient (see Stage)."""


class Stage(L.LightningModule):
    """Base of the training stages. Subclasses build their networks in `configure_model` with
    `build_denoiser` and implement training_step.

    Non-finite steps: a step whose loss (any micro-batch) or gradient is NaN or Inf on any rank
    is skipped by every rank (the decision is one all-reduce), so no weight, optimizer state or
    EMA ever takes a non-finite value; skips are counted (`train/nonfinite_skipped`). After
    `max_nonfinite_steps` skipped steps in a row the run saves a checkpoint and stops with
    `NonFiniteError`. A skipped step still counts as a step (global_step, the learning-rate
    schedule and the data position move on), so the per-sample random streams stay as they were.
    """

    def __init__(self, options: StageOptions, optim: OptimSpec, default_sampler: SamplerConfig):
        super().__init__()
        self.options, self.optim_spec = options, optim
        # the options by their own names, as the stages read them
        self.tok_spec, self.text_spec, self.sharding, self.seed = (
            options.tokenizer,
            options.text,
            options.sharding,
            options.seed,
        )
        self.ema_decay, self.export_to = options.ema_decay, options.export_to
        self.max_nonfinite_steps = options.max_nonfinite_steps
        self.sampler = options.sampler or default_sampler
        self.nonfinite_total = self.nonfinite_run = 0  # skipped steps: since the start, in a row now
        self._loss_bad: torch.Tensor | None = None  # this rank's losses since the last optimizer step
        self._skipped_step = False  # the last optimizer step was skipped
        self.ema: EMAWeights | None = None
        tok = options.tokenizer
        self.tokenizer = None if tok.kind == "none" else build_tokenizer(tok.kind, tok.path, **tok.options)
        self.text_encoder = build_text_encoder(options.text.encoder, options.text.max_length)

    # --- networks -----------------------------------------------------------------------------

    def check_clip(self, frames: int, height: int, width: int) -> None:
        """ValueError, before any network is built or file written, when clips of this size do not
        encode to latents every network's patch divides (found otherwise in the first forward)."""
        if self.tokenizer is None:
            return
        latent = self.tokenizer.latent_shape(frames, height, width)[1:]  # raises for the tokenizer
        held = list(vars(self).values())  # a stage keeps its NetSpecs as attributes (DMD2: a dict of them)
        held += [v for d in held if isinstance(d, dict) for v in d.values()]
        for spec in (v for v in held if isinstance(v, NetSpec)):
            patch = self.net_config(spec, []).dit.patch
            if any(n % p for n, p in zip(latent, patch, strict=True)):
                raise ValueError(
                    f"clips of {frames}x{height}x{width} (frames x height x width) encode to latents of "
                    f"{latent}, which the network's patch {tuple(patch)} does not divide: choose "
                    f"a height and width that are multiples of "
                    f"{patch[1] * self.tokenizer.spatial_factor}x{patch[2] * self.tokenizer.spatial_factor}"
                )

    def net_config(self, spec: NetSpec, modalities: list[str]) -> NetConfig:
        """The NetConfig to build: from `init_from` if given, else the preset fitted to the tokenizer."""
        if spec.init_from:
            cfg = Denoiser.config_from(spec.init_from)
            self.check_fits(cfg, spec.init_from)
        else:
            cfg = preset(spec.preset, **spec.overrides)
            if self.tokenizer is not None:
                cfg.dit.latent_channels = self.tokenizer.latent_channels
                cfg.control.channels = max(cfg.control.channels, self.tokenizer.latent_channels)
            if self.text_encoder is not None:  # the text width the network reads is the encoder's
                if cfg.dit.text_proj_in:
                    cfg.dit.text_proj_in = self.text_encoder.out_dim
                else:
                    cfg.dit.text_dim = self.text_encoder.out_dim
        if spec.control:
            cfg.control = control_config(cfg, spec)
        if spec.sparse:
            cfg.dit.sparse = SparseAttention.from_dict(spec.sparse)
        cfg.modalities = list(modalities)
        return cfg

    def check_fits(self, cfg: NetConfig, source: str) -> None:
        """A saved network must read this recipe's latents and text: say so before any shape error."""
        if self.tokenizer is not None and self.tokenizer.latent_channels != cfg.dit.latent_channels:
            raise ValueError(
                f"{source} takes {cfg.dit.latent_channels}-channel latents but the tokenizer "
                f"gives {self.tokenizer.latent_channels}"
            )
        width = cfg.dit.text_proj_in or cfg.dit.text_dim
        if self.text_encoder is not None and self.text_encoder.out_dim != width:
            raise ValueError(
                f"{source} reads {width}-wide text embeddings but the text encoder gives {self.text_encoder.out_dim}"
            )

    def mesh(self):
        """The mesh networks are sharded over (None without a process group): data_parallel, or
        data x context flattened (dp_cp) under context parallelism (trainers/strategy.py)."""
        return shard_mesh(self.device_mesh)

    def data_rank(self) -> tuple[int, int]:
        """(rank, size) along the data-parallel dimension: what batches and per-sample random
        streams follow. The ranks of one context-parallel group share them."""
        world = self._trainer.world_size if self._trainer is not None else 1
        return data_parallel_rank(self.device_mesh, self.global_rank, world)

    def build_device(self) -> torch.device:
        """Where networks built on the meta device are materialised."""
        return self.trainer.strategy.root_device if self._trainer else torch.device("cpu")

    def build_denoiser(self, spec: NetSpec, modalities: list[str], trainable: str | None) -> Denoiser:
        """Meta build -> freeze -> shard -> materialise -> seeded init -> load `init_from`.

        trainable: "control" (control branches only), "all", or None (frozen network).
        Control branches missing from `init_from` start as copies of the base's first blocks
        with zero output projections, so training starts exactly at the base.
        """
        cfg = self.net_config(spec, modalities)
        with torch.device("meta"):
            model = Denoiser(cfg)
        model.requires_grad_(False)
        if trainable == "control":
            model.controls.requires_grad_(True)
        elif trainable == "all":
            model.requires_grad_(True)
        elif trainable is not None:
            check_trainable(trainable)
        shard_model(model, self.mesh(), self.sharding)
        model.set_context_parallel(context_group(self.device_mesh))
        model.to_empty(device=self.build_device())
        model.init_weights(self.seed)
        model.init_from = spec.init_from  # a plain attribute: generation_settings inherits from it
        if spec.init_from:
            load_weights(model, spec.init_from)
        else:
            for branch in model.controls.values():
                branch.init_from_base(model.net)
        return model

    def track_ema(self, model: Denoiser) -> None:
        """Shadow `model`'s trainable weights (call in configure_model, after build_denoiser)."""
        if self.ema_decay:
            self.ema = EMAWeights(model, self.ema_decay)

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # The EMA follows each optimizer step here, not in on_train_batch_end: checkpoint callbacks
        # save at batch end before the module's own hook runs, so an EMA updated there was saved
        # one step behind and a resumed run lost that update.
        if self.ema is not None and not self._skipped_step:
            self.ema.update(self.trained_model())

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.stop_if_nonfinite()

    # --- non-finite losses and gradients ----------------------------------------------------------

    def on_before_backward(self, loss: torch.Tensor) -> None:
        """Note a non-finite loss of this rank (no sync: decided at the optimizer step). A NaN
        loss does not always give NaN gradients (e.g. a NaN constant term), hence both checks."""
        bad = ~torch.isfinite(loss.detach()).all()
        self._loss_bad = bad if self._loss_bad is None else self._loss_bad | bad

    def on_before_optimizer_step(self, optimizer) -> None:
        """Before every optimizer step (automatic and manual optimization alike; after DMD2's own
        clipping, which leaves a non-finite norm non-finite): skip it on every rank if any rank
        saw a non-finite loss or gradient. Skipping drops the gradients, so the optimizer's step
        updates nothing (AdamW passes over parameters without a gradient: no weight, moment or
        weight-decay change)."""
        self._skipped_step = self.nonfinite_anywhere(optimizer)
        if self._skipped_step:
            optimizer.zero_grad(set_to_none=True)
            self.nonfinite_total += 1
            self.nonfinite_run += 1
        else:
            self.nonfinite_run = 0
        self.log("train/nonfinite_skipped", float(self.nonfinite_total), reduce_fx="max")

    def nonfinite_anywhere(self, optimizer) -> bool:
        """Whether any rank has a non-finite loss since its last step or a non-finite gradient of
        this optimizer's parameters (local shards); one all-reduce, so every rank agrees."""
        local = (
            g.to_local() if isinstance(g, DTensor) else g
            for group in optimizer.param_groups
            for p in group["params"]
            if (g := p.grad) is not None
        )
        grads = [g for g in local if g.numel()]
        flag = torch.zeros((), device=self.device)
        if grads:  # a sum of norms is finite iff every element is (one small kernel per dtype)
            norms = torch.stack([n.float() for n in torch._foreach_norm(grads)])
            flag = (~torch.isfinite(norms.sum())).float().to(flag.device)
        if self._loss_bad is not None:
            flag = torch.maximum(flag, self._loss_bad.float().to(flag.device))
        self._loss_bad = None
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def stop_if_nonfinite(self) -> None:
        """After `max_nonfinite_steps` skipped steps in a row: checkpoint the current (finite)
        state, which `--ckpt_path last` resumes, and stop every rank with NonFiniteError."""
        if not self.max_nonfinite_steps or self.nonfinite_run < self.max_nonfinite_steps:
            return
        step = self.trainer.global_step
        path = save_atomic(self.trainer, checkpoint_path(self.trainer, f"nonfinite-step={step}"))
        raise NonFiniteError(
            f"stopped: {self.nonfinite_run} optimizer steps in a row (steps {step - self.nonfinite_run + 1}.."
            f"{step}) had a non-finite loss or gradient on at least one rank ({self.nonfinite_total} skipped "
            f"in all). No weight took a non-finite value; the state after the last good step is saved in "
            f"{path}. Look for a learning rate that is too high, bf16 overflow or broken data, then resume "
            f"with --ckpt_path {path} (or last); max_nonfinite_steps sets how many skips in a row are allowed."
        )

    def trained_model(self) -> Denoiser:
        """The network this stage trains (the one EMA tracks and export writes)."""
        return self.model

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep each network's NetConfig and the name of the network the EMA shadows next to the
        hyperparameters (meta.pt of a sharded checkpoint): `vidistill consolidate` then needs no
        tokenizer, text encoder or still-existing `init_from`, and never guesses between networks."""
        from ..nets.gan import GANHead

        nets = {name: module.cfg.to_dict() for name, module in self.named_children() if isinstance(module, Denoiser)}
        checkpoint["net_configs"] = nets
        checkpoint["head_configs"] = {
            name: m.cfg.to_dict() for name, m in self.named_children() if isinstance(m, GANHead)
        }
        if self.ema is not None:
            checkpoint["ema_of"] = next(n for n, m in self.named_children() if m is self.trained_model())
        checkpoint["trained"] = next(n for n, m in self.named_children() if m is self.trained_model())
        checkpoint["generation"] = asdict(self.generation_settings())
        checkpoint["nonfinite_skipped"] = self.nonfinite_total

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """The skip count carries over; the count in a row starts again (a resumed run is a new try)."""
        self.nonfinite_total, self.nonfinite_run = int(checkpoint.get("nonfinite_skipped", 0)), 0

    def generation_settings(self) -> GenerationSettings:
        """What inference needs besides the trained network's weights (its generation.json). A
        stage that reads precomputed text or latents (tokenizer or text encoder `none`, as KD and
        DMD2 do) passes on those of the network it started from."""
        settings = GenerationSettings(
            tokenizer=asdict(self.tok_spec),
            text={"encoder": self.text_spec.encoder, "max_length": self.text_spec.max_length},
            sampler=asdict(self.sampler),
        )
        source = getattr(self.trained_model(), "init_from", None)
        inherited = GenerationSettings.load(source) if source else None
        if inherited is not None:
            if settings.tokenizer["kind"] == "none":
                settings.tokenizer = inherited.tokenizer
            if settings.text["encoder"] == "none":
                settings.text = inherited.text
        return settings

    def on_train_end(self) -> None:
        if self.export_to:
            self.export(self.trained_model(), self.export_to)

    # --- batches --------------------------------------------------------------------------------

    @torch.no_grad()
    def latents(self, batch: dict, key: str) -> torch.Tensor:
        """Latents of `video` or `control`: precomputed (`latent`, `control_latent`) or encoded now."""
        pre = {"video": "latent", "control": "control_latent"}[key]
        if pre in batch:
            return batch[pre].float()
        if self.tokenizer is None:
            raise ValueError(f"the batch has no precomputed {pre} and the recipe's tokenizer.kind is none")
        return self.tokenizer.encode(to_unit(batch[key])).float()

    @torch.no_grad()
    def text(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if "text_emb" in batch:
            return batch["text_emb"].float(), batch["text_mask"].bool()
        if self.text_encoder is None:
            raise ValueError("the batch has no text_emb and the recipe's text.encoder is none")
        emb, mask = self.text_encoder.encode(list(batch["caption"]))
        return emb.to(self.device).float(), mask.to(self.device)

    def sample_index(self, i: int, batch_size: int, micro: int = 0) -> int:
        """Global index of local sample i of accumulation micro-batch `micro`: within an optimizer
        step, micro-batch m of every rank comes before m + 1, and ranks hold consecutive slices."""
        rank, world = self.data_rank()
        return (micro * world + rank) * batch_size + i

    def tokens_per_sample(self, batch: dict) -> int:
        """DiT tokens of one sample (for throughput): latent frames x patches."""
        cfg = self.trained_model().cfg.dit
        if "latent" in batch:
            T, H, W = batch["latent"].shape[-3:]
        elif self.tokenizer is not None:
            _, T, H, W = self.tokenizer.latent_shape(*batch["video"].shape[-3:])
        else:
            return 0
        return (T // cfg.patch[0]) * (H // cfg.patch[1]) * (W // cfg.patch[2])

    def log_skipped(self, batch: dict) -> None:
        """Broken samples the datamodule skipped for this batch, summed over ranks (data/skipped)."""
        if "skipped" in batch:
            self.log("data/skipped", batch["skipped"].float().sum(), reduce_fx="sum", sync_dist=True)

    @staticmethod
    def fps(batch: dict) -> float | None:
        """One fps per batch (RoPE is per batch); the datamodule delivers clips at one rate."""
        return float(batch["fps"][0]) if "fps" in batch else None

    # --- one optimizer step ----------------------------------------------------------------------

    def loss(self, batch: dict, step: int, micro: int = 0) -> torch.Tensor:
        """The batch's mean loss at optimizer step `step`, accumulation micro-batch `micro` (the
        per-sample random streams depend on both). Stages with one optimizer implement it."""
        raise NotImplementedError

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch, self.global_step, batch_idx % self.trainer.accumulate_grad_batches)
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        self.log_skipped(batch)
        return loss

    # --- samples ----------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self, batch: dict, seed: int = 0, sampler: SamplerConfig | None = None, use_control: bool = True
    ) -> torch.Tensor:
        """Videos (B, 3, T, H, W) uint8 of the trained network for a batch's prompts and controls
        (sample-video callback, evaluation), sampled with `sampler` (default the stage's
        `self.sampler`). The unconditional branch of CFG is the null text training dropped to."""
        if self.tokenizer is None:
            raise ValueError("sample videos need a tokenizer to decode (tokenizer.kind is none)")
        sampler = sampler or self.sampler
        x0 = self.latents(batch, "video")
        text, mask = self.text(batch)
        controls = {self.modality: self.latents(batch, "control")} if self.modality and use_control else {}
        null, null_mask = null_text(text, mask)
        cond = Cond(
            text=text, text_mask=mask, neg_text=null, neg_text_mask=null_mask, controls=controls, fps=self.fps(batch)
        )
        # each data-parallel rank its own stream (stride 7919: the streams these samples always had)
        g = torch.Generator(device=x0.device).manual_seed(mix_seed(self.data_rank()[0], seed, strides=(7919,)))
        noise = torch.randn(x0.shape, generator=g, device=x0.device)
        latents = Sampler(self.trained_model()).sample(cond, noise, sampler, generator=g)
        return to_uint8(self.tokenizer.decode(latents))

    # --- optimisation ---------------------------------------------------------------------------

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self):
        params = self.trainable_parameters()
        if not params:
            raise ValueError("nothing to train: no parameter requires grad")
        opt, sched = adamw(params, self.optim_spec)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # --- export ---------------------------------------------------------------------------------

    def export(self, model: Denoiser, path: str | Path) -> None:
        """Full (unsharded) weights of `model` (its EMA where tracked) as a Denoiser directory
        (config.json + model.safetensors, Denoiser.from_pretrained), written by rank 0."""
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.ema is not None:
            ema = {k: v for k, v in self.ema.state_for(model).items() if k in self.ema.names}
            full = {k: (v.full_tensor() if isinstance(v, DTensor) else v).cpu() for k, v in ema.items()}
            state.update(full)
        if self.global_rank == 0:
            with written(path) as tmp:  # the directory appears whole (the quickstart's "done" mark)
                model.save_pretrained(tmp, state)
                self.generation_settings().save(tmp)


def load_weights(model: Denoiser, path: str | Path) -> None:
    """Load a Denoiser directory into a (possibly sharded) model. Control branches absent from the
    file start from the base's first blocks; any other missing or unexpected key is an error."""
    from safetensors.torch import load_file

    state = load_file(Path(path) / "model.safetensors")
    expected = set(get_model_state_dict(model).keys())
    for name, branch in model.controls.items():
        if not any(k.startswith(f"controls.{name}.") for k in state):
            for i in range(len(branch.blocks)):
                for k in [k for k in state if k.startswith(f"net.blocks.{i}.")]:
                    state[f"controls.{name}.blocks.{i}." + k[len(f"net.blocks.{i}.") :]] = state[k]
    missing = sorted(
        k for k in expected - set(state) if not any(part in k for part in (".embed.", ".before_proj.", ".after_proj."))
    )
    unexpected = sorted(k for k in set(state) - expected if not k.startswith("controls."))
    if missing or unexpected:
        raise ValueError(f"{path} does not fit the network: missing {missing}, unexpected {unexpected}")
    state = {k: v for k, v in state.items() if k in expected}
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))
