"""`denoise(x_t, t, cond) -> x0`: the one interface stages and samplers call a network through.

`Denoiser` holds the base DiT and one control branch per modality. It turns rectified-flow
states into clean-latent predictions (x0 = x_t - t v, modules/flow.py's convention), handles
conditioning latent frames (their x0 is the given clean latent, exactly) and mixes controls.
Losses, samplers, KD and DMD2 never touch the network's internals.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn as nn

from datamodules.files import write_text, written

from . import flow
from .nets.control_branch import ControlBranch, mix_residuals
from .nets.dit import DiT
from .nets.init import seeded_init
from .nets.presets import NetConfig


@dataclass
class Cond:
    """What a prediction is conditioned on. Tensors are batch-first; all but `text` are optional."""

    text: torch.Tensor
    """(B, L, D) text embeddings (D = text_dim, or text_proj_in when the net projects)."""
    text_mask: torch.Tensor | None = None
    """(B, L) bool, True on real tokens; None attends to every position (Cosmos zero-pads)."""
    neg_text: torch.Tensor | None = None
    """Negative-prompt embeddings for classifier-free guidance (same layout as `text`)."""
    neg_text_mask: torch.Tensor | None = None
    controls: dict[str, torch.Tensor] = field(default_factory=dict)
    """Control latents per modality, (B, C, T, H, W) on the same latent grid as x_t."""
    control_weights: dict[str, float | torch.Tensor] = field(default_factory=dict)
    """Per modality: a scalar or a (B, 1, T, H, W) map at any resolution (default 1.0)."""
    cond_latents: torch.Tensor | None = None
    """(B, C, T, H, W) clean latents; used where `cond_frames` is 1."""
    cond_frames: torch.Tensor | None = None
    """(B, T) 0/1: which latent frames are conditioning (video2world, chained chunks)."""
    fps: float | None = None
    padding_mask: torch.Tensor | None = None
    """(B or 1, 1, H, W) at pixel (or any) resolution, 1 on padded pixels."""

    def negative(self) -> Cond:
        """The unconditional branch of CFG: the negative prompt in place of the prompt."""
        if self.neg_text is None:
            raise ValueError("classifier-free guidance needs negative-prompt embeddings (Cond.neg_text)")
        return replace(self, text=self.neg_text, text_mask=self.neg_text_mask)


def _frames_t(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-sample (B,) or per-frame (B, T) times shaped to broadcast against x (B, C, T, H, W)."""
    return (t.view(-1, 1, 1, 1, 1) if t.ndim == 1 else t[:, None, :, None, None]).to(x.dtype)


def drop_text(text: torch.Tensor, mask: torch.Tensor, drop: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The null text where `drop` (B,) is True: zero embeddings with every position visible, so
    cross-attention to it adds exactly 0. Training drops to it (text dropout) and CFG's
    unconditional branch uses it when no negative prompt is given."""
    keep = (~drop).view(-1, 1, 1).to(text.dtype)
    mask = torch.where(drop.view(-1, 1), torch.ones_like(mask), mask)
    return text * keep, mask


def null_text(text: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The null text of a whole batch (`drop_text` with every sample dropped)."""
    return drop_text(text, mask, torch.ones(len(text), dtype=torch.bool, device=text.device))


class Denoiser(nn.Module):
    def __init__(self, cfg: NetConfig, device=None, dtype=None):
        super().__init__()
        self.cfg = cfg
        self.net = DiT(cfg.dit, device, dtype)
        self.controls = nn.ModuleDict({m: ControlBranch(cfg.dit, cfg.control, device, dtype) for m in cfg.modalities})

    def set_context_parallel(self, group) -> Denoiser:
        """Split the tokens of every later call across the ranks of `group` (context parallelism,
        modules/nets/context.py); None turns it off. Callers see whole tensors either way."""
        self.net.set_context_parallel(group)
        return self

    def output(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The network's raw output (v or x0, `cfg.prediction`) for inputs x at per-sample (B,)
        or per-frame (B, T) time t."""
        s, residuals = self._prepare(x, t, cond)
        return self.net.head(self.net.run_blocks(s, residuals), s)

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The velocity v = eps - x0 predicted for inputs x at time t (B,) or (B, T)."""
        out = self.output(x, t, cond)
        if self.cfg.prediction == "velocity":
            return out
        return (x - out) / _frames_t(t, x)

    def _prepare(self, x: torch.Tensor, t: torch.Tensor, cond: Cond):
        """Embedded inputs and the mixed control residuals per target block."""
        cond_mask = None
        if cond.cond_frames is not None:
            B, _, T, H, W = x.shape
            cond_mask = cond.cond_frames.to(x.dtype)[:, None, :, None, None].expand(B, 1, T, H, W)
        text_mask = cond.text_mask if self.cfg.use_text_mask else None
        s = self.net.prepare(x, t, cond.text, text_mask, cond.fps, cond_mask, cond.padding_mask)
        residuals = None
        active = [m for m in cond.controls if m in self.controls]
        unknown = set(cond.controls) - set(self.controls)
        if unknown:
            raise KeyError(f"no control branch for {sorted(unknown)}; this network has {sorted(self.controls)}")
        if active:
            outs = [self.controls[m](cond.controls[m], s) for m in active]
            weights = [cond.control_weights.get(m, 1.0) for m in active]
            mixed = mix_residuals(outs, weights, s.grid, s.local)
            residuals = dict(zip(self.cfg.control.targets(), mixed))
        return s, residuals

    def _inputs(self, x_t: torch.Tensor, t: torch.Tensor | float, cond: Cond):
        """(x_in, t_in, m, t): the network's input with conditioning frames put in clean at
        `cond_frame_t`, m (B, 1, T, 1, 1) marking them (None without), and t as (B,)."""
        B = x_t.shape[0]
        t = torch.as_tensor(t, device=x_t.device, dtype=torch.float32)
        t = t.expand(B) if t.ndim == 0 else t
        if cond.cond_frames is None:
            return x_t, t, None, t
        if cond.cond_latents is None:
            raise ValueError("cond_frames given without cond_latents")
        frames = cond.cond_frames.float()
        m = frames.to(x_t.dtype)[:, None, :, None, None]
        x_in = m * cond.cond_latents.to(x_t.dtype) + (1 - m) * x_t
        return x_in, frames * self.cfg.cond_frame_t + (1 - frames) * t[:, None], m, t

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor | float, cond: Cond) -> torch.Tensor:
        """x0 prediction for x_t = (1 - t) x0 + t eps at per-sample time t (B,) or scalar.

        Conditioning frames enter the network clean, at time `cond_frame_t`, and their x0 is
        returned as given; elsewhere x0 = x_t - t v (rectified flow).
        """
        x_in, t_in, m, t = self._inputs(x_t, t, cond)
        out = self.output(x_in, t_in, cond)
        # t in x_t's dtype: under bf16 the product is taken in bf16, as the network's output is
        x0 = out if self.cfg.prediction == "x0" else flow.x0_from_velocity(x_t, out, t.to(x_t.dtype))
        return x0 if m is None else m * x_in + (1 - m) * x0

    def features(
        self, x_t: torch.Tensor, t: torch.Tensor | float, cond: Cond, taps: tuple[int, ...]
    ) -> list[torch.Tensor]:
        """The trunk's token features (B, N, dim) after each block in `taps` (after control
        injection, in block order), from the same inputs `denoise` builds; the blocks after the
        last tap are not run. What a GAN head on this network reads (DMD2's discriminator)."""
        if not taps:
            raise ValueError("features needs at least one block index in taps")
        x_in, t_in, _, _ = self._inputs(x_t, t, cond)
        s, residuals = self._prepare(x_in, t_in, cond)
        return self.net.run_blocks(s, residuals, taps=tuple(taps))[1]

    forward = denoise

    # --- building and checkpoints -------------------------------------------------------------

    def init_weights(self, seed: int = 0) -> Denoiser:
        """Deterministic init from `seed` (`nets.init.seeded_init`): a meta-device build
        materialised with `to_empty` equals an eager build."""
        seeded_init(self, seed)
        return self

    @classmethod
    def build(cls, cfg: NetConfig, seed: int = 0, device="cpu", dtype=None) -> Denoiser:
        """Build on the meta device (no memory, no init work), materialise on `device`, init from seed."""
        with torch.device("meta"):
            model = cls(cfg, dtype=dtype)
        model.to_empty(device=device)
        return model.init_weights(seed)

    def save_pretrained(self, path: str | Path, state: dict[str, torch.Tensor] | None = None) -> None:
        """`config.json` + `model.safetensors` in a directory; `state` (e.g. gathered full or EMA
        weights of a sharded model) replaces this module's own state dict."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        write_text(path / "config.json", self.cfg_json())
        state = self.state_dict() if state is None else state
        with written(path / "model.safetensors") as tmp:  # never a half-written one under its name
            save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, tmp)

    def cfg_json(self) -> str:
        return json.dumps(self.cfg.to_dict(), indent=2)

    @staticmethod
    def config_from(path: str | Path) -> NetConfig:
        """The NetConfig of a directory written by save_pretrained / import-weights / export.
        Raises FileNotFoundError without config.json and ValueError, naming the file, when it
        is no vidistill network config."""
        file = Path(path) / "config.json"
        if not file.is_file():
            raise FileNotFoundError(f"{file} not found (expected a vidistill network directory)")
        try:
            return NetConfig.from_dict(json.loads(file.read_text()))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{file}: not JSON ({err})") from None
        except (ValueError, TypeError) as err:
            raise ValueError(f"{file}: {err}") from None

    @classmethod
    def from_pretrained(cls, path: str | Path, device="cpu", dtype=None) -> Denoiser:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(path)
        for name in ("config.json", "model.safetensors"):
            if not (path / name).is_file():
                raise FileNotFoundError(f"{path / name} not found (expected a directory written by save_pretrained)")
        cfg = cls.config_from(path)
        with torch.device("meta"):
            model = cls(cfg, dtype=dtype)
        try:
            state = load_file(path / "model.safetensors", device=str(device))
        except SafetensorError as err:
            raise ValueError(f"{path / 'model.safetensors'}: not a safetensors file ({err})") from None
        mismatch = _mismatch({k: v.shape for k, v in model.state_dict().items()}, state)
        if mismatch:
            raise ValueError(f"{path / 'model.safetensors'} does not fit its config.json: {mismatch}")
        model.load_state_dict(state, strict=True, assign=True)
        if dtype is not None:
            model.to(dtype)
        return model


def _mismatch(expected: dict[str, torch.Size], state: dict[str, torch.Tensor]) -> str:
    """What keeps `state` from loading into a model of these parameter shapes, in one line ("" if
    nothing): missing and unexpected keys and differing shapes, counted, with the first of each."""

    def few(items: list[str]) -> str:
        return ", ".join(items[:2]) + (", ..." if len(items) > 2 else "")

    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k} {tuple(state[k].shape)} in the file, {tuple(expected[k])} in the config"
        for k in sorted(set(expected) & set(state))
        if tuple(state[k].shape) != tuple(expected[k])
    ]
    parts = [
        f"{len(items)} {what} ({few(items)})"
        for what, items in (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes))
        if items
    ]
    return "; ".join(parts)
