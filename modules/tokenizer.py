"""Video tokenizers (VAEs) behind one small protocol.

Videos are ``(B, 3, T, H, W)`` floats in ``[-1, 1]``; latents are ``(B, C, T', H', W')``,
normalised per channel (zero mean, unit std) where the tokenizer ships statistics.
Everything downstream (datamodules, losses, samplers, the Sampler) only talks to
:class:`Tokenizer`, so swapping the embedded ``pixel`` default for a real VAE is a config change.

Frame rules. A *causal* tokenizer with temporal factor ``f`` maps ``T = 1 + f*k`` frames to
``1 + k`` latent frames (the first frame is coded alone, so a single image is a valid clip).
A *non-causal* one needs ``T`` divisible by ``f`` and maps it to ``T / f``. Height and width must
be divisible by the spatial factor. Anything else raises ``ValueError``.

Tokenizers are frozen ``nn.Module``s: parameters never require grad, they stay in eval mode even
when a parent module calls ``.train()``, and ``encode``/``decode`` run under ``torch.no_grad``
unless built with ``no_grad=False`` (gradients then flow to the *input*, e.g. for pixel losses).

Dtypes. Latents come back in float32 (they are small, and normalisation is done in float32);
decoded videos come back in the tokenizer's compute dtype, uncast, because a 720p x 93-frame
video is ~1 GB in float32 and a needless copy of it is the expensive kind.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from einops import rearrange
from torch import Tensor, nn

from .dtypes import to_dtype

__all__ = [
    "Tokenizer",
    "VideoTokenizer",
    "PixelTokenizer",
    "CosmosJITTokenizer",
    "WanTokenizer",
    "build_tokenizer",
    "TOKENIZER_KINDS",
]

TOKENIZER_KINDS = ("pixel", "cosmos-jit", "wan2.1")


@runtime_checkable
class Tokenizer(Protocol):
    """What the rest of the suite may rely on."""

    latent_channels: int
    temporal_factor: int
    spatial_factor: int

    def encode(self, video: Tensor) -> Tensor: ...

    def decode(self, latents: Tensor) -> Tensor: ...

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]: ...

    def num_frames(self, latent_frames: int) -> int: ...


class VideoTokenizer(nn.Module):
    """Shared base: shape rules, input validation, freezing and the no-grad default.

    Subclasses set ``latent_channels``, ``temporal_factor``, ``spatial_factor``, ``causal``
    and implement ``_encode`` / ``_decode`` on already validated tensors.
    """

    latent_channels: int
    temporal_factor: int
    spatial_factor: int
    causal: bool

    def __init__(self, no_grad: bool = True) -> None:
        super().__init__()
        self.no_grad = no_grad

    # -- shape rules ------------------------------------------------------------------------

    def latent_frames(self, frames: int) -> int:
        """Latent frame count for ``frames`` video frames; ``ValueError`` if not allowed."""
        f = self.temporal_factor
        if frames < 1:
            raise ValueError(f"need at least 1 frame, got {frames}")
        if self.causal:
            if (frames - 1) % f:
                raise ValueError(
                    f"{type(self).__name__} is causal with temporal factor {f}: frame count must be "
                    f"1 + {f}*k (e.g. {1 + f * ((frames - 1) // f)} or {1 + f * ((frames - 1) // f + 1)}), "
                    f"got {frames}"
                )
            return 1 + (frames - 1) // f
        if frames % f:
            raise ValueError(
                f"{type(self).__name__} has temporal factor {f}: frame count must be divisible by {f}, got {frames}"
            )
        return frames // f

    def num_frames(self, latent_frames: int) -> int:
        """Video frame count that encodes to ``latent_frames`` latent frames (inverse rule)."""
        if latent_frames < 1:
            raise ValueError(f"need at least 1 latent frame, got {latent_frames}")
        f = self.temporal_factor
        return 1 + f * (latent_frames - 1) if self.causal else f * latent_frames

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """``(C, T', H', W')`` of the latents for a ``frames x height x width`` video."""
        s = self.spatial_factor
        if height < 1 or width < 1 or height % s or width % s:
            raise ValueError(
                f"{type(self).__name__} has spatial factor {s}: height and width must be positive "
                f"multiples of {s}, got {height}x{width}"
            )
        return (self.latent_channels, self.latent_frames(frames), height // s, width // s)

    # -- frozen module ----------------------------------------------------------------------

    def freeze(self) -> VideoTokenizer:
        """Stop gradients to the weights and switch to eval mode (called by subclasses)."""
        for p in self.parameters():
            p.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True) -> VideoTokenizer:
        # A LightningModule's .train() recurses into children; a frozen VAE must stay in eval
        # (dropout/normalisation layers in shipped tokenizers would otherwise change the latents).
        return super().train(False)

    def _grad_context(self) -> contextlib.AbstractContextManager:
        return torch.no_grad() if self.no_grad else contextlib.nullcontext()

    # -- public encode / decode ---------------------------------------------------------------

    def encode(self, video: Tensor) -> Tensor:
        """``(B, 3, T, H, W)`` in [-1, 1] -> normalised latents ``(B, C, T', H', W')``."""
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"expected a video of shape (B, 3, T, H, W), got {tuple(video.shape)}")
        self.latent_shape(*video.shape[2:])  # validates T, H, W
        with self._grad_context():
            return self._encode(video)

    def decode(self, latents: Tensor) -> Tensor:
        """Normalised latents ``(B, C, T', H', W')`` -> video ``(B, 3, T, H, W)`` in [-1, 1]."""
        if latents.ndim != 5 or latents.shape[1] != self.latent_channels:
            raise ValueError(
                f"expected latents of shape (B, {self.latent_channels}, T', H', W'), got {tuple(latents.shape)}"
            )
        self.num_frames(latents.shape[2])  # validates T'
        with self._grad_context():
            return self._decode(latents)

    def _encode(self, video: Tensor) -> Tensor:
        raise NotImplementedError

    def _decode(self, latents: Tensor) -> Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (
            f"latent_channels={self.latent_channels}, temporal_factor={self.temporal_factor}, "
            f"spatial_factor={self.spatial_factor}, causal={self.causal}"
        )


class PixelTokenizer(VideoTokenizer):
    """Lossless space-to-depth: the embedded default, no weights.

    ``(B, 3, T, H, W) -> (B, 3*t*s*s, T/t, H/s, W/s)``, channels ordered ``(rgb, dt, dy, dx)``.
    Non-causal in time (``T`` divisible by ``temporal``). No normalisation: the latents are the
    pixel values themselves, so the round trip is bit-exact and keeps the input dtype.
    """

    def __init__(self, spatial: int = 4, temporal: int = 1, no_grad: bool = True) -> None:
        super().__init__(no_grad=no_grad)
        if spatial < 1 or temporal < 1:
            raise ValueError(f"spatial and temporal factors must be >= 1, got {spatial}, {temporal}")
        self.spatial_factor = spatial
        self.temporal_factor = temporal
        self.latent_channels = 3 * spatial * spatial * temporal
        self.causal = False
        self.freeze()

    def _encode(self, video: Tensor) -> Tensor:
        f, s = self.temporal_factor, self.spatial_factor
        return rearrange(video, "b c (t dt) (h dy) (w dx) -> b (c dt dy dx) t h w", dt=f, dy=s, dx=s)

    def _decode(self, latents: Tensor) -> Tensor:
        f, s = self.temporal_factor, self.spatial_factor
        return rearrange(latents, "b (c dt dy dx) t h w -> b c (t dt) (h dy) (w dx)", c=3, dt=f, dy=s, dx=s)


def _stats(values: Any, channels: int, name: str) -> Tensor:
    """Per-channel statistics as float32 ``(1, C, T_s, 1, 1)``, ``T_s`` = 1 or per latent frame."""
    t = torch.as_tensor(values, dtype=torch.float32)
    if t.numel() % channels:
        raise ValueError(f"{name} has {t.numel()} values, not a multiple of latent_channels={channels}")
    return t.reshape(1, channels, -1, 1, 1).clone()


class _NormalisedTokenizer(VideoTokenizer):
    """Base for tokenizers with per-channel ``latent_mean`` / ``latent_std`` buffers."""

    latent_mean: Tensor
    latent_std: Tensor

    def _set_stats(self, mean: Any, std: Any) -> None:
        # non-persistent: the stats belong to the tokenizer files, not to our checkpoints
        self.register_buffer("latent_mean", _stats(mean, self.latent_channels, "latent mean"), persistent=False)
        self.register_buffer("latent_std", _stats(std, self.latent_channels, "latent std"), persistent=False)

    def _stats_for(self, frames: int) -> tuple[Tensor, Tensor]:
        mean, std = self.latent_mean, self.latent_std
        if mean.shape[2] > 1 or std.shape[2] > 1:  # per-frame statistics (Cosmos ships these)
            if min(mean.shape[2], std.shape[2]) < frames:
                raise ValueError(
                    f"latent statistics cover {min(mean.shape[2], std.shape[2])} latent frames, got {frames}"
                )
            mean, std = mean[:, :, :frames], std[:, :, :frames]
        # .float(): a caller may have cast the whole module to bf16; normalise in fp32 anyway
        return mean.float(), std.float()

    def normalise(self, z: Tensor) -> Tensor:
        """Raw latents -> normalised float32 latents, ``(z - mean) / std``."""
        mean, std = self._stats_for(z.shape[2])
        return (z.float() - mean) / std

    def denormalise(self, latents: Tensor) -> Tensor:
        """Normalised latents -> raw float32 latents, ``latents * std + mean``."""
        mean, std = self._stats_for(latents.shape[2])
        return latents.float() * std + mean


def _module_dtype_device(module: nn.Module, fallback: Tensor) -> tuple[torch.dtype, torch.device]:
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype, p.device
    return torch.float32, fallback.device


class CosmosJITTokenizer(_NormalisedTokenizer):
    """NVIDIA Cosmos tokenizer shipped as TorchScript: ``encoder.jit``, ``decoder.jit``, ``mean_std.pt``.

    ``mean_std.pt`` holds a ``(mean, std)`` pair, each reshapeable to ``(1, C, -1, 1, 1)``; with
    per-frame statistics they are sliced to the latent frame count. Compression factors come from,
    in order: explicit constructor arguments, an optional ``config.json`` in the directory
    (keys ``latent_channels``, ``temporal_factor``, ``spatial_factor``, ``causal``), and the
    defaults of a causal 4x8x8 tokenizer with 16 channels.

    ``latents = (encoder(video) - mean) / std``; ``decode(latents) = decoder(latents * std + mean)``.
    ``dtype`` casts the TorchScript weights (e.g. ``torch.bfloat16``); inputs are cast to the
    weights' dtype and device.
    """

    DEFAULTS = {"latent_channels": 16, "temporal_factor": 4, "spatial_factor": 8, "causal": True}

    def __init__(
        self,
        path: str | os.PathLike,
        latent_channels: int | None = None,
        temporal_factor: int | None = None,
        spatial_factor: int | None = None,
        causal: bool | None = None,
        dtype: torch.dtype | str | None = None,
        no_grad: bool = True,
    ) -> None:
        super().__init__(no_grad=no_grad)
        root = Path(path)
        files = {name: root / name for name in ("encoder.jit", "decoder.jit", "mean_std.pt")}
        for name, file in files.items():
            if not file.is_file():
                raise FileNotFoundError(f"Cosmos JIT tokenizer: missing {name} in {root} (looked for {file})")

        cfg = dict(self.DEFAULTS)
        if (root / "config.json").is_file():
            with open(root / "config.json") as fh:
                cfg.update({k: v for k, v in json.load(fh).items() if k in self.DEFAULTS})
        explicit = dict(
            latent_channels=latent_channels,
            temporal_factor=temporal_factor,
            spatial_factor=spatial_factor,
            causal=causal,
        )
        cfg.update({k: v for k, v in explicit.items() if v is not None})
        self.latent_channels = int(cfg["latent_channels"])
        self.temporal_factor = int(cfg["temporal_factor"])
        self.spatial_factor = int(cfg["spatial_factor"])
        self.causal = bool(cfg["causal"])

        with warnings.catch_warnings():
            # TorchScript is deprecated upstream, but it is the format NVIDIA ships these in
            warnings.simplefilter("ignore", FutureWarning)
            self.encoder = torch.jit.load(str(files["encoder.jit"]), map_location="cpu")
            self.decoder = torch.jit.load(str(files["decoder.jit"]), map_location="cpu")
        dtype = to_dtype(dtype, allow_none=True)
        if dtype is not None:
            self.encoder.to(dtype)
            self.decoder.to(dtype)
        mean, std = torch.load(files["mean_std.pt"], map_location="cpu", weights_only=True)
        self._set_stats(mean, std)
        self.freeze()

    def _encode(self, video: Tensor) -> Tensor:
        dtype, device = _module_dtype_device(self.encoder, self.latent_mean)
        out = self.encoder(video.to(device=device, dtype=dtype))  # no copy when already matching
        z = out[0] if isinstance(out, (tuple, list)) else out
        return self.normalise(z)

    def _decode(self, latents: Tensor) -> Tensor:
        dtype, device = _module_dtype_device(self.decoder, self.latent_mean)
        z = self.denormalise(latents.to(self.latent_mean.device)).to(device=device, dtype=dtype)
        out = self.decoder(z)
        return out[0] if isinstance(out, (tuple, list)) else out


class WanTokenizer(_NormalisedTokenizer):
    """Wan2.1 VAE through diffusers' ``AutoencoderKLWan`` (optional extra ``wan``), loaded from a local dir.

    Normalisation is the one diffusers' Cosmos2.5 Transfer pipeline uses: ``latents_mean`` /
    ``latents_std`` from the VAE config viewed as ``(1, z_dim, 1, 1, 1)``, and
    ``latents = (z - mean) / std``. We take the posterior *mode* (deterministic; the pipeline
    samples) and normalise in float32 (bit-identical to the pipeline for a float32 VAE; with a
    bf16 VAE the pipeline rounds the statistics to bf16 first). Factors come from the config's
    ``scale_factor_temporal`` / ``scale_factor_spatial``, falling back to what
    ``temperal_downsample`` (sic) and ``patch_size`` imply. The VAE is causal: ``1 + 4k`` frames.

    ``dtype`` loads the weights in that dtype (e.g. ``torch.bfloat16`` for 720p);
    ``tiling=True`` enables diffusers' spatially tiled encode/decode to bound activation memory.
    ``channels_last=True`` stores the 3D convolutions' weights and the latents channels-last, and
    ``compile=True`` compiles the decoder (torch.compile, inductor; a string names another
    backend). On the 720p decode (docs/benchmarks.md) channels-last alone is 1.11x and both 1.76x,
    after a first decode that compiles for about 1.5 minutes. ``vae`` wraps an ``AutoencoderKLWan``
    already built instead of loading ``path`` (benchmarks time a randomly initialised one); ``dtype``
    then does not apply.
    """

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        dtype: torch.dtype | str | None = None,
        tiling: bool = False,
        channels_last: bool = False,
        compile: bool | str = False,
        no_grad: bool = True,
        vae: nn.Module | None = None,
    ) -> None:
        super().__init__(no_grad=no_grad)
        if (path is None) == (vae is None):
            raise ValueError("WanTokenizer needs exactly one of path (a local AutoencoderKLWan dir) and vae")
        if vae is None:
            try:
                from diffusers import AutoencoderKLWan
            except ImportError as e:
                raise ImportError('WanTokenizer needs diffusers: pip install -e ".[wan]"') from e
            root = Path(path)
            if not (root / "config.json").is_file():
                # checked here because from_pretrained would read a missing dir as a Hub repo id
                raise FileNotFoundError(
                    f"Wan VAE: no config.json in {root} (expected a diffusers AutoencoderKLWan dir)"
                )
            vae = AutoencoderKLWan.from_pretrained(
                str(root), torch_dtype=to_dtype(dtype, allow_none=True), local_files_only=True
            )
        self.vae = vae
        if tiling:
            self.vae.enable_tiling()
        self.channels_last = channels_last
        if channels_last:  # only the 5-D weights: channels_last_3d refuses the 2-D convolutions' 4-D ones
            for m in self.vae.modules():
                if isinstance(m, nn.Conv3d):
                    m.to(memory_format=torch.channels_last_3d)
        self.compiled = bool(compile)
        if compile:
            self.vae.decoder.compile(backend="inductor" if compile is True else compile)

        cfg = self.vae.config
        where = path if path is not None else "the given vae"
        if getattr(cfg, "latents_mean", None) is None or getattr(cfg, "latents_std", None) is None:
            raise ValueError(f"Wan VAE config in {where} must define both latents_mean and latents_std")
        self.latent_channels = int(cfg.z_dim)
        down = list(cfg.temperal_downsample)
        self.temporal_factor = int(cfg.scale_factor_temporal or 2 ** sum(down))
        self.spatial_factor = int(cfg.scale_factor_spatial or 2 ** len(down) * (cfg.patch_size or 1))
        self.causal = True
        self._set_stats(cfg.latents_mean, cfg.latents_std)
        self.freeze()

    def _encode(self, video: Tensor) -> Tensor:
        z = self.vae.encode(video.to(device=self.vae.device, dtype=self.vae.dtype)).latent_dist.mode()
        return self.normalise(z)

    def _decode(self, latents: Tensor) -> Tensor:
        z = self.denormalise(latents.to(self.latent_mean.device)).to(device=self.vae.device, dtype=self.vae.dtype)
        if self.channels_last:
            z = z.contiguous(memory_format=torch.channels_last_3d)
        # the decoder runs once per latent frame with a Python-side cache, and where Dynamo splits
        # it, every block's inner functions see several channel counts and cache states: torch's
        # default of 8 compiled versions per function would leave the rest uncompiled
        limits = torch._dynamo.config.patch(recompile_limit=64) if self.compiled else contextlib.nullcontext()
        with limits:
            return self.vae.decode(z, return_dict=False)[0]


def build_tokenizer(kind: str, path: str | os.PathLike | None = None, **kwargs: Any) -> VideoTokenizer:
    """Build a tokenizer by name: ``pixel`` (no weights), ``cosmos-jit`` or ``wan2.1`` (local ``path``).

    ``kwargs`` go to the constructor (e.g. ``spatial=4`` for pixel, ``dtype=torch.bfloat16``).
    """
    key = kind.lower()
    if key == "pixel":
        if path is not None:
            warnings.warn(f"the pixel tokenizer has no weights; ignoring path={path!r}", stacklevel=2)
        return PixelTokenizer(**kwargs)
    if key not in TOKENIZER_KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {', '.join(TOKENIZER_KINDS)}")
    if path is None:
        raise ValueError(f"tokenizer kind {kind!r} needs path= (a local directory with its weights)")
    if key == "cosmos-jit":
        return CosmosJITTokenizer(path, **kwargs)
    return WanTokenizer(path, **kwargs)
