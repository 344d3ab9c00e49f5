"""`VideoDataModule`: webdataset shards -> fixed-size batches of clips, controls, masks,
text embeddings and latents, identical in count on every rank.

Shard format (one sample per clip, key ``{key}``): ``mp4``; the caption in ``txt`` or in
``json`` (``{"caption": str, "fps": float, ...}``; the video2dataset layout reads as it is);
optional ``<modality>.mp4`` control videos, ``keypoint.json`` (per-frame ``(K, 2|3)`` pixel
keypoints), ``mask.mp4`` (white = control applies), ``text.safetensors`` (``emb`` (L, D),
``mask`` (L,) uint8) and ``latent.safetensors`` (``latent`` (C, T', H', W'), optionally
``control.<modality>``).

Batch (a dict; B = batch_size, every tensor on CPU until Lightning moves it):

- ``video`` uint8 (B, 3, T, H, W) -- absent with ``use_latents``
- ``control`` uint8 (B, 3, T, H, W) when ``modality`` is set (with ``use_latents`` and a
  ``control.<modality>`` latent in the sample: ``control_latent`` (B, C, T', H', W') instead)
- ``mask`` float32 (B, 1, T, H, W) when any sample of the batch has ``mask.mp4`` (the others
  get ones); ControlTraining and DMD2 weight their control by it (``Cond.control_weights``, as
  a spec's mask_path does in inference), KDWarmup does not read it
- ``caption`` list[str], ``key`` list[str], ``fps`` float32 (B,) (the clip's rate:
  ``target_fps``, else the source fps / ``stride``)
- ``text_emb`` (B, L, D) + ``text_mask`` bool (B, L) with ``use_text_embeddings`` (shorter
  embeddings are zero-padded to the batch's longest, mask False there)
- ``latent`` (B, C, T', H', W') with ``use_latents``
- ``kd_noise``, ``kd_states``, ``kd_t`` with ``use_kd`` (see its argument)
- ``skipped`` int64 scalar: broken samples reported with this batch (see "Broken samples")

Probe, at `setup` ("fit"): every sample of the train shards is read once and checked the way
the loader will read it (`SampleLoader.check`: its members, its json and safetensors, its
videos' container headers -- frame count, fps, size -- without decoding frames); a sample that
lacks a member, does not open, is shorter than the clip or smaller than ``height`` x ``width``
(it would be upscaled) is broken. The result (per shard: sample count, broken indices) is cached
in memory and on disk (``$VIDISTILL_PROBE_CACHE``, default ``~/.cache/vidistill/probe``; see
`datamodules.shards`), keyed by the shard's path, size and mtime and by the settings the check
depends on, so a second setup reads only the cache. No process group is used: each rank probes
(or finds cached) every shard, starting at its own offset so ranks sharing the cache split the
work.

Training stream, per epoch ``e`` (exact; `datamodules.shards.Split`): the sequence of the epoch
is every good sample once, shards in a ``(seed, e)`` order, samples in shard order, followed by
further passes (other shard orders) where more positions are asked for. With B =
``batches_per_epoch`` (default ``ceil(good / (world_size * batch_size))``) rank ``r`` takes the
contiguous positions ``[r * B * batch_size, (r + 1) * B * batch_size)``, so (with the default
B) every good sample comes exactly once per epoch over all ranks and workers, and only the last
``B * world_size * batch_size - good`` positions (fewer than ``world_size * batch_size``) repeat
samples, to complete the last batches. Within the rank, logical worker ``w`` of W (DataLoader
workers, at least 1) takes the next ``B // W + (w < B % W)`` batches' contiguous positions, so
the DataLoader's round-robin gives batch ``j`` from worker ``j % W`` and every rank yields
exactly B batches. A worker reads only the shards its positions cover. With ``resample`` each
worker draws shards with replacement (seeded by (seed, epoch, rank, worker)) and reads their
good samples instead. The random clip start (and the random control parameters) of a sample
come from ``random.Random`` seeded by (seed, epoch, pass, shard, sample index): the same for
every layout of ranks and workers.

Epoch mechanism: the train DataLoader is an `EpochLoader` whose ``__iter__`` asks the
datamodule which epoch and batch to start at and hands them to the dataset (``set_epoch``)
before the workers start; the epoch is ``trainer.current_epoch`` (or `set_epoch` without a
Trainer), unless a loaded state says otherwise. This works with Lightning's default
``reload_dataloaders_every_n_epochs=0`` (the same loader is iterated once per epoch) and with
reloading. Workers are not persistent: each epoch's workers start with that epoch's state.

Resume: `state_dict` is ``{"epoch", "batches", "skipped_total"}`` (batches = delivered to
training on this rank this epoch, counted in `on_after_batch_transfer`; a LightningModule that
overrides that hook takes it over from the datamodule, then call this one from it). After
`load_state_dict` the next stream continues that epoch: every worker starts after its share of
the delivered batches (positions, so broken samples found by the probe change nothing; a local
shard's samples before them are seeked past, a remote one's read past without decoding), and the
workers' roles are rotated so batch order continues exactly. Exact when world size and
``num_workers`` are unchanged, unless a sample that passed the probe failed to load in the
passed-over part (the worker's spare samples then shift; counts and batches still hold). A state
with the whole epoch delivered continues at the next epoch.

Broken samples: those the probe found never enter the split; each is reported in ``skipped``
once per epoch, with the batch of the good sample that follows it in the epoch's first pass (the
last ones with the last good sample), so `skipped_total` grows by exactly the number of broken
samples per full epoch, whatever the layout (with a smaller explicit ``batches_per_epoch``: those
of the delivered positions). A damaged shard's unreadable rest counts as one broken sample (the
shard is probed again by the next process). A sample that passes the probe but fails to load (frames
that do not decode, a member that does not fit the batch) is counted when met and replaced by the
worker's own samples again, from its first, so the batch counts hold. A worker stops with a
RuntimeError naming its shards after ``MAX_CONSECUTIVE_FAILURES`` failures in a row, or after a
pass over its samples again without a usable one; setup raises when no sample is good.

Validation: the first ``val_samples`` samples of ``val_shards`` in the listed order, split
into contiguous per-rank ranges of ``ceil(N / world)`` samples; a shorter range is padded by
repeating its own samples from its start (ranges stay disjoint). Clips start at frame 0,
computed controls use ``control_preset`` (default "medium"), and a broken sample is replaced by
the next one of the rank's range, so every call yields the same batches.
"""

from __future__ import annotations

import logging
import math
import time
from itertools import islice
from typing import Any

import lightning
import torch
from torch.utils.data import DataLoader

from datamodules.controls import MODALITIES
from datamodules.datasets import MAX_CONSECUTIVE_FAILURES, EpochLoader, TrainDataset, ValDataset, val_indices
from datamodules.sample import SAMPLE_ERRORS, SampleLoader, collate
from datamodules.shards import (
    Split,
    count_samples,
    expand_shards,
    probe_shards,
)

__all__ = ["MAX_CONSECUTIVE_FAILURES", "SAMPLE_ERRORS", "VideoDataModule", "collate"]

log = logging.getLogger(__name__)


class VideoDataModule(lightning.LightningDataModule):
    """Clips, controls, captions (and precomputed text embeddings / latents) from webdataset
    shards, with an equal number of fixed-size batches on every rank (see the module doc)."""

    def __init__(
        self,
        train_shards: str | list[str],
        val_shards: str | list[str] | None = None,
        batch_size: int = 1,
        num_workers: int = 2,
        num_frames: int = 93,
        height: int = 480,
        width: int = 832,
        stride: int = 1,
        target_fps: float | None = None,
        modality: str | None = "edge",
        control_preset: str | None = None,
        use_text_embeddings: bool = False,
        use_latents: bool = False,
        use_kd: bool = False,
        seed: int = 0,
        batches_per_epoch: int | None = None,
        resample: bool = False,
        val_samples: int = 64,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        """
        Args:
            train_shards: brace pattern (``"data/train-{000000..000009}.tar"``), glob, directory
                (all ``*.tar`` in it, sorted), URL, or a list of these.
            val_shards: the same for validation; None: no validation.
            batch_size: samples per batch (per rank), always full in training.
            num_workers: DataLoader worker processes per rank (0: in the main process).
            num_frames: frames per clip.
            height: output height (resize to cover, center crop).
            width: output width.
            stride: take every `stride`-th source frame (exclusive with `target_fps`).
            target_fps: resample clips to this frame rate (source fps from the container).
            modality: the control to deliver (edge, blur, depth, seg, keypoint): ``<modality>.mp4``
                if present, else computed (edge, blur) or rendered from keypoint.json
                (keypoint), else the sample is broken. None: no control.
            control_preset: edge/blur preset; training draws random parameters when None
                (within the preset for blur), validation uses it (default "medium").
            use_text_embeddings: require ``text.safetensors`` and deliver ``text_emb``/``text_mask``.
            use_latents: deliver ``latent.safetensors`` (and ``control.<modality>`` from it as
                ``control_latent``) instead of decoding the video.
            use_kd: KD shards (``vidistill make-kd-data``): deliver ``kd.safetensors`` as
                ``kd_noise`` (B, C, T', H', W'), and where present ``kd_states`` (B, K, C, T', H', W')
                with their times ``kd_t`` (B, K), the teacher's clean latent as ``latent`` and the
                exact control pixels as ``control``; clips start at frame 0 (the noise belongs to
                the clip). Transfer1 KD shards (noise only) decode the teacher video as usual.
            seed: seeds shard order, clip starts and random control parameters.
            batches_per_epoch: batches per rank and epoch; None: ceil(good samples in the train
                shards / (world_size * batch_size)), so an epoch delivers every good sample once
                (a few again to complete the last batches). Given: the epoch is that many
                positions of the epoch's sequence (further passes over the data when more).
            resample: each worker draws shards with replacement (seeded) and reads their good
                samples, instead of its share of the epoch's sequence.
            val_samples: validation uses the first this many samples of `val_shards`.
            rank: this process's data-parallel rank; None: the Trainer's (its global rank unless
                context parallelism groups ranks; 0 without a Trainer).
            world_size: number of data-parallel ranks; None: the Trainer's (1 without a Trainer).
        """
        super().__init__()
        if modality is not None and modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES} or None, got {modality!r}")
        for name, value in (
            ("batch_size", batch_size),
            ("num_frames", num_frames),
            ("height", height),
            ("width", width),
            ("stride", stride),
            ("val_samples", val_samples),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if target_fps is not None and (target_fps <= 0 or stride != 1):
            raise ValueError("target_fps must be positive and cannot be combined with stride > 1")
        if batches_per_epoch is not None and batches_per_epoch < 1:
            raise ValueError(f"batches_per_epoch must be >= 1, got {batches_per_epoch}")
        self.save_hyperparameters()
        self.train_shards, self.val_shards = train_shards, val_shards
        self.batch_size, self.num_workers = batch_size, num_workers
        self.seed, self.resample, self.val_samples = seed, resample, val_samples
        self.batches_per_epoch = batches_per_epoch
        self.rank, self.world_size = rank, world_size
        self.loader = SampleLoader(
            num_frames,
            height,
            width,
            stride,
            target_fps,
            modality,
            control_preset,
            use_text_embeddings,
            use_latents,
            use_kd,
        )
        self._rank, self._world = rank or 0, world_size or 1
        self._train_urls: list[str] | None = None
        self._split: Split | None = None
        self._val_urls: list[str] | None = None
        self._bpe: int | None = None
        self._epoch = 0  # set_epoch, for use without a Trainer
        self._stream = (0, 0)  # (epoch, batches delivered) of the current training stream
        self._resume: tuple[int, int] | None = None
        self._skipped_base = 0
        self._skipped_acc: torch.Tensor | None = None  # summed on the batch's device, no sync

    # ---- setup -------------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        """Resolve rank/world, list the shards and derive `batches_per_epoch` if not given."""
        trainer = self.trainer
        # the data-parallel rank and size (Lightning's sampler arguments): the ranks of one
        # context-parallel group read the same batches (trainers/strategy.py)
        dp = getattr(trainer.strategy, "distributed_sampler_kwargs", None) if trainer else None
        dp_rank, dp_world = (dp["rank"], dp["num_replicas"]) if dp else (0, 1)
        self._rank = self.rank if self.rank is not None else dp_rank
        self._world = self.world_size if self.world_size is not None else dp_world
        if not 0 <= self._rank < self._world:
            raise ValueError(f"rank {self._rank} is outside world size {self._world}")
        if stage in (None, "fit"):
            self._train_urls = expand_shards(self.train_shards)
            self._split = self._probe(self._train_urls)
            if self.batches_per_epoch is not None:
                self._bpe = self.batches_per_epoch
            else:
                self._bpe = math.ceil(self._split.total / (self._world * self.batch_size))
        if stage in (None, "fit", "validate") and self.val_shards is not None:
            self._val_urls = expand_shards(self.val_shards)

    def check_train_data(self, rank: int = 0, world: int = 1) -> None:
        """Probe the train shards now (cached, so setup's probe costs nothing more): ValueError in
        one line when no sample is usable, before a Trainer has written anything. `rank` of
        `world` only orders the probe, as in setup (ranks sharing a cache split the work)."""
        if self.train_shards is not None:
            self._rank, self._world = rank, world
            self._probe(expand_shards(self.train_shards))

    def _probe(self, urls: list[str]) -> Split:
        """Probe every train sample (cached; see `datamodules.shards.probe_shards`): the split."""
        t0 = time.perf_counter()
        loader = self.loader

        def check(raw: dict) -> str | None:
            try:
                loader.check(raw)
            except SAMPLE_ERRORS as e:
                return f"{type(e).__name__}: {e}"
            return None

        probes = probe_shards(urls, check, loader.requirements(), self._rank, self._world)
        split = Split.from_probes(probes)
        log.info(
            "probed %d train shards in %.2f s: %d good samples, %d broken",
            len(urls),
            time.perf_counter() - t0,
            split.total,
            split.broken,
        )
        examples = list(islice((f"{urls[s]}: {why}" for s, p in enumerate(probes) for why in p.bad.values()), 3))
        if split.total == 0:
            raise ValueError(
                f"no usable sample in the {len(urls)} train shards ({', '.join(urls[:3])}"
                f"{', ...' if len(urls) > 3 else ''}): all {split.broken} are broken with these settings,"
                f" e.g. {'; '.join(examples)}"
            )
        if split.broken:
            log.warning(
                "%d of %d train samples are broken and left out of the split (counted in `skipped` once per"
                " epoch), e.g. %s",
                split.broken,
                split.total + split.broken,
                "; ".join(examples),
            )
        return split

    @property
    def train_batches_per_epoch(self) -> int:
        """Batches each rank yields per epoch (after `setup`)."""
        if self._bpe is None:
            self.setup("fit")
        return self._bpe

    # ---- dataloaders -------------------------------------------------------------------

    def _dataloader_kwargs(self) -> dict:
        kw: dict[str, Any] = dict(
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=False,
        )
        return kw

    def train_dataloader(self) -> DataLoader:
        """The rank's training stream; re-iterating it starts the current epoch (module doc)."""
        if self._train_urls is None:
            self.setup("fit")
        ds = TrainDataset(
            self.loader,
            self._train_urls,
            self._split,
            self.batch_size,
            self.train_batches_per_epoch,
            self.seed,
            self._rank,
            self._world,
            self.resample,
        )
        return EpochLoader(ds, self._begin_stream, **self._dataloader_kwargs())

    def val_dataloader(self) -> DataLoader | list:
        """The rank's fixed validation batches (an empty list without `val_shards`)."""
        if self.val_shards is None:
            return []
        if self._val_urls is None:
            self.setup("validate")
        total, n = 0, self.val_samples
        for url in self._val_urls:
            total += count_samples(url)
            if total >= n:
                break
        total = min(total, n)
        if total == 0:
            raise ValueError(f"val_shards {self.val_shards!r} hold no samples")
        ds = ValDataset(
            self.loader, self._val_urls, val_indices(total, self._rank, self._world), self.batch_size, self._rank
        )
        kw = self._dataloader_kwargs()
        kw["num_workers"] = min(self.num_workers, len(ds))
        return DataLoader(ds, **kw)

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next training stream starts (without a Trainer; with one the
        Trainer's ``current_epoch`` is used)."""
        self._epoch = int(epoch)

    def _begin_stream(self) -> tuple[int, int]:
        """(epoch, start batch) for a new iteration of the train loader."""
        current = self.trainer.current_epoch if self.trainer is not None else self._epoch
        epoch, start = current, 0
        if self._resume is not None:
            r_epoch, r_batches = self._resume
            self._resume = None
            if r_batches >= self.train_batches_per_epoch:
                r_epoch, r_batches = r_epoch + 1, 0
            if r_epoch >= current:
                epoch, start = r_epoch, r_batches
        self._epoch = epoch
        self._stream = (epoch, start)
        return epoch, start

    # ---- counting and resume -------------------------------------------------------------

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count training batches and their skipped samples (main process; no device sync)."""
        training = self.trainer is None or self.trainer.training
        if training and isinstance(batch, dict) and "skipped" in batch:
            self._stream = (self._stream[0], self._stream[1] + 1)
            s = batch["skipped"]
            if isinstance(s, torch.Tensor):
                acc = self._skipped_acc
                self._skipped_acc = s.detach().clone() if acc is None else acc + s.to(acc.device)
            else:
                self._skipped_base += int(s)
        return batch

    @property
    def skipped_total(self) -> int:
        """Broken samples skipped in training batches delivered so far (this rank)."""
        if self._skipped_acc is not None:
            self._skipped_base += int(self._skipped_acc)
            self._skipped_acc = None
        return self._skipped_base

    @skipped_total.setter
    def skipped_total(self, value: int) -> None:
        self._skipped_base, self._skipped_acc = int(value), None

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._stream[0], "batches": self._stream[1], "skipped_total": self.skipped_total}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        epoch, batches = int(state_dict["epoch"]), int(state_dict["batches"])
        self.skipped_total = int(state_dict.get("skipped_total", 0))
        self._stream = (epoch, batches)
        self._resume = (epoch, batches)
        self._epoch = epoch
