"""Teacher trajectories for knowledge distillation: what `vidistill make-kd-data` samples and stores
for the KD warmup (modules/stages/kd_warmup.py), as shards the VideoDataModule reads with
``use_kd: true``.

Per sample (key = the source sample's key):

- ``kd.safetensors``: ``noise`` (C, T', H', W'), the teacher's input at t = 1; ``states``
  (K, C, T', H', W'), the teacher's sampler state at each time of the student's t-list;
  ``t`` (K,), those times (after the shift); ``x0``, the teacher's clean latent (t = 0); and
  ``control.<modality>`` (3, T, H, W) uint8, the exact control pixels the teacher saw.
- ``text.safetensors``: the text embeddings the teacher was conditioned on (``emb``, ``mask``;
  datamodules/formats.py).
- ``mp4`` the decoded teacher video, ``<modality>.mp4`` the control (both to look at: mp4v is
  lossy, the safetensors are exact), ``txt`` the caption and ``json`` the settings.

The teacher's grid passes exactly through the student's times (`flow.schedule_through`), so the
saved states are points of the very trajectory that produced ``x0``. Noise is drawn per sample
from (seed, key), so a sample's data do not depend on batch size, rank count or resuming.

Several processes (torchrun): rank r takes every r-th planned sample and writes its own shards to
``OUT/rank{r:03d}`` (one index.json per rank, resumable); one process writes to ``OUT``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save as st_save

from datamodules.codec import encode_video
from datamodules.formats import TEXT_MEMBER, save_text
from datamodules.sample import SAMPLE_ERRORS, SampleLoader, collate
from datamodules.shards import expand_shards, iter_tar_samples
from datamodules.writer import SkipSample, tar_keys, write_shards

from .. import flow
from ..denoiser import Cond, Denoiser, null_text
from ..dtypes import to_dtype
from ..sampling import Sampler, SamplerConfig, to_uint8, to_unit
from ..text import build_text_encoder
from ..tokenizer import build_tokenizer

KD_MEMBER = "kd.safetensors"
KD_VERSION = 1


def kd_noise(seed: int, key: str, shape: Sequence[int]) -> torch.Tensor:
    """A sample's noise at t = 1, a function of (seed, key) only (CPU generator, float32)."""
    digest = hashlib.sha256(f"vidistill-kd:{seed}:{key}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") % (2**63))
    return torch.randn(tuple(shape), generator=g)


@dataclass
class Trajectories:
    """A batch's teacher trajectories, on the teacher's device."""

    noise: torch.Tensor
    """(B, C, T', H', W'), the state at t = 1."""
    states: dict[float, torch.Tensor]
    """Student time -> (B, C, T', H', W') state the teacher's sampler passed through there."""
    x0: torch.Tensor
    text: torch.Tensor
    """(B, L, D) float32 prompt embeddings the teacher was conditioned on, and their mask."""
    mask: torch.Tensor


class KDTeacher:
    """A teacher with its tokenizer and text encoder that samples batches of the datamodule's
    samples through the student's times, recording its states there."""

    def __init__(
        self,
        net: Denoiser,
        tokenizer: torch.nn.Module,
        encoder: torch.nn.Module | None,
        sampler: SamplerConfig,
        times: tuple[float, ...],
        modality: str | None = None,
        negative_prompt: str | None = None,
        seed: int = 0,
        source: str = "",
        components: dict | None = None,
    ):
        self.net, self.tok, self.encoder, self.sampler = net, tokenizer, encoder, sampler
        self.times, self.modality, self.negative_prompt, self.seed = times, modality, negative_prompt, seed
        # where the teacher came from and how its tokenizer and text encoder were built: part of
        # what a resumed run must match
        self.source, self.components = source, components or {}
        self.device = next(net.parameters()).device

    @classmethod
    def load(
        cls,
        teacher: str,
        *,
        modality: str | None,
        tokenizer: str,
        tokenizer_path: str | None,
        tokenizer_options: dict[str, Any] | None,
        text_encoder: str,
        max_length: int,
        sampler: str,
        steps: int,
        guidance: float,
        shift: float,
        t_list: Sequence[float] = flow.STUDENT_T_LIST,
        t_shift: float = 5.0,
        negative_prompt: str | None = None,
        seed: int = 0,
        device: str = "auto",
    ) -> KDTeacher:
        """The teacher network directory with its tokenizer and text encoder, on `device` (auto:
        cuda:LOCAL_RANK when CUDA is there, else cpu), sampling with `sampler` (euler or
        dpmpp_2m) in `steps` whose grid passes through the student's times: `t_list` after
        `t_shift`."""
        if device == "auto":
            device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
        dev = torch.device(device)
        net = Denoiser.from_pretrained(teacher, device=dev).eval().requires_grad_(False)
        if modality and modality not in net.controls:
            raise ValueError(f"{teacher} has no {modality} control branch (it has {sorted(net.controls)})")
        tok = build_tokenizer(tokenizer, tokenizer_path, **(tokenizer_options or {})).to(dev)
        if tok.latent_channels != net.cfg.dit.latent_channels:
            raise ValueError(
                f"{teacher} takes {net.cfg.dit.latent_channels}-channel latents, "
                f"the tokenizer gives {tok.latent_channels}"
            )
        encoder = build_text_encoder(text_encoder, max_length)
        cfg = SamplerConfig(sampler=sampler, steps=steps, guidance=guidance, shift=shift)
        times = flow.student_t_list(t_list, t_shift)
        components = dict(
            tokenizer=tokenizer,
            tokenizer_options=tokenizer_options or {},
            text_encoder=text_encoder,
            max_length=max_length,
        )
        return cls(net, tok, encoder, cfg, times, modality, negative_prompt, seed, str(teacher), components)

    def settings(self) -> dict:
        """The teacher's sampling, as every sample's json records it."""
        return {
            "teacher": self.source,
            "modality": self.modality,
            "guidance": self.sampler.guidance,
            "negative_prompt": self.negative_prompt,
            "sampler": self.sampler.sampler,
            "steps": self.sampler.steps,
            "shift": self.sampler.shift,
            "t_list": list(self.times),
            "seed": self.seed,
        }

    def _text(self, batch: dict, n: int) -> tuple[torch.Tensor, ...]:
        """Prompt and negative embeddings with masks: the negative prompt's, else the null text
        that training drops captions to."""
        dev = self.device
        if self.encoder is not None:
            text, mask = self.encoder.encode(batch["caption"])
        else:
            text, mask = batch["text_emb"], batch["text_mask"]
        text, mask = text.to(dev).float(), mask.to(dev)
        if self.negative_prompt is None:
            neg, neg_mask = null_text(text, mask)
        else:
            if self.encoder is None:
                raise ValueError("a negative_prompt needs a text encoder")
            neg, neg_mask = (x.to(dev) for x in self.encoder.encode([self.negative_prompt] * n))
        return text, mask, neg, neg_mask

    @torch.no_grad()
    def trajectories(self, batch: dict, keys: Sequence[str], num_frames: int, height: int, width: int) -> Trajectories:
        """Sample a collated batch (`keys` its samples' keys) from each sample's `kd_noise`."""
        dev = self.device
        text, mask, neg, neg_mask = self._text(batch, len(keys))
        modality = self.modality
        controls = {modality: self.tok.encode(to_unit(batch["control"].to(dev))).float()} if modality else {}
        shape = self.tok.latent_shape(num_frames, height, width)
        noise = torch.stack([kd_noise(self.seed, key, shape) for key in keys]).to(dev)
        cond = Cond(
            text=text,
            text_mask=mask,
            neg_text=neg.float(),
            neg_text_mask=neg_mask,
            controls=controls,
            fps=float(batch["fps"][0]),
        )
        states: dict[float, torch.Tensor] = {}

        def record(t: float, x: torch.Tensor) -> None:
            for want in self.times:
                if abs(t - want) < 1e-9:
                    states[want] = x.detach().clone()

        x0 = Sampler(self.net).sample(cond, noise, self.sampler, through=self.times, on_state=record)
        missing = [t for t in self.times if t not in states]
        if missing:
            raise RuntimeError(f"the teacher grid missed the student times {missing}")
        return Trajectories(noise, states, x0, text, mask)

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) uint8 videos of the clean latents, on the CPU."""
        return to_uint8(self.tok.decode(x0)).cpu()


def sample_members(
    sample: dict,
    batch: dict,
    i: int,
    run: Trajectories,
    times: tuple[float, ...],
    decoded: torch.Tensor,
    modality: str | None,
    dtype: torch.dtype,
    settings: dict,
) -> list[tuple[str, bytes]]:
    """The shard members of batch sample `i` (see the module doc); latents and embeddings stored
    in `dtype`, `settings` in its json."""
    kd = {
        "noise": run.noise[i].to(dtype).cpu(),
        "states": torch.stack([run.states[t][i] for t in times]).to(dtype).cpu(),
        "t": torch.tensor(times, dtype=torch.float32),
        "x0": run.x0[i].to(dtype).cpu(),
    }
    fps = float(batch["fps"][i])
    members = []
    video = decoded[i].permute(1, 2, 3, 0).numpy()
    members.append(("mp4", encode_video(np.ascontiguousarray(video), fps)))
    if modality:
        control = batch["control"][i]
        kd[f"control.{modality}"] = control.contiguous()
        members.append(
            (f"{modality}.mp4", encode_video(np.ascontiguousarray(control.permute(1, 2, 3, 0).numpy()), fps))
        )
    meta = dict(settings, caption=sample["caption"], fps=fps, source_key=sample["key"], teacher_states=True)
    members += [
        ("txt", sample["caption"].encode()),
        ("json", json.dumps(meta).encode()),
        (TEXT_MEMBER, save_text(run.text[i], run.mask[i], dtype)),
        (KD_MEMBER, st_save({k: v.contiguous() for k, v in kd.items()})),
    ]
    return members


class KDSamples:
    """`write_shards`' build function: a planned key's shard members. The teacher samples
    `batch_size` planned keys at a time (the asked key and the ones after it), reading the source
    samples in shard order, as the plan asks for them."""

    def __init__(
        self,
        teacher: KDTeacher,
        loader: SampleLoader,
        urls: Sequence[str],
        planned: list[str],
        batch_size: int,
        dtype: torch.dtype,
        settings: dict,
    ):
        self.teacher, self.loader, self.planned, self.batch_size = teacher, loader, planned, batch_size
        self.dtype, self.settings = dtype, settings
        # raw samples in shard order, consumed lazily (the plan is in the same order)
        self.raws: Iterator[dict] = (raw for url in urls for raw in iter_tar_samples(url))
        self.done: dict[str, list] = {}

    def __call__(self, key: str) -> list[tuple[str, bytes]]:
        if key not in self.done:
            start = self.planned.index(key)
            self._run(self.planned[start : start + self.batch_size])
        members = self.done.pop(key)
        if members and isinstance(members[0], SkipSample):
            raise members[0]
        return members

    def _run(self, keys: list[str]) -> None:
        samples = []
        for key in keys:
            raw = next(r for r in self.raws if r["__key__"] == key)
            try:
                samples.append(self.loader(raw, None))
            except SAMPLE_ERRORS as err:
                self.done[key] = [SkipSample(f"{type(err).__name__}: {err}")]
        if not samples:
            return
        batch = collate(samples)
        loader, teacher = self.loader, self.teacher
        run = teacher.trajectories(batch, [s["key"] for s in samples], loader.num_frames, loader.height, loader.width)
        decoded = teacher.decode(run.x0)
        for i, s in enumerate(samples):
            self.done[s["key"]] = sample_members(
                s, batch, i, run, teacher.times, decoded, teacher.modality, self.dtype, self.settings
            )


def check_options(store_dtype: str, batch_size: int) -> torch.dtype:
    """The dtype named `store_dtype`; refuses a bad name or batch size before any work."""
    dtype = to_dtype(store_dtype, "store_dtype")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return dtype


def write_kd_shards(
    teacher: KDTeacher,
    shards: str,
    out: str,
    *,
    num_samples: int | None = None,
    num_frames: int,
    height: int,
    width: int,
    batch_size: int = 1,
    samples_per_shard: int = 100,
    store_dtype: str = "float32",
    resume: bool = True,
    progress: bool = True,
) -> list[Path]:
    """Sample the teacher on the first `num_samples` samples of `shards` (None: all), as clips of
    `num_frames` x `height` x `width` from frame 0, and write KD shards to `out` (under torchrun,
    this rank's share to out/rank<r>). A resumed run keeps the shards an identical earlier run
    finished. Returns the shard paths."""
    dtype = check_options(store_dtype, batch_size)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    loader = SampleLoader(
        num_frames, height, width, 1, None, teacher.modality, "medium", teacher.encoder is None, False
    )
    urls = expand_shards(shards)
    keys = [k for url in urls for k in tar_keys(url)]
    keys = keys[:num_samples] if num_samples else keys
    mine = keys[rank::world]
    if not mine:
        raise ValueError(f"rank {rank} of {world} has no samples (the source holds {len(keys)})")
    target = Path(out) / f"rank{rank:03d}" if world > 1 else Path(out)
    settings = teacher.settings()
    build = KDSamples(teacher, loader, urls, mine, batch_size, dtype, settings)
    config = dict(
        settings,
        frames=num_frames,
        size=[height, width],
        **teacher.components,
        store_dtype=store_dtype,
        version=KD_VERSION,
    )
    paths = write_shards(
        target,
        mine,
        build,
        samples_per_shard,
        "kd",
        config,
        resume,
        progress,
        info={"source": "teacher samples", "rank": rank, "world": world},
        created_by="vidistill make-kd-data",
    )
    print(f"wrote {len(paths)} KD shards ({len(mine)} planned samples) to {target}")
    return paths
