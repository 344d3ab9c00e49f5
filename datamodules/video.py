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

Epoch mechanism: the train DataLoader is an `_EpochLoader` whose ``__iter__`` asks the
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
import random
import time
from collections.abc import Callable, Iterable, Iterator
from itertools import count, groupby, islice
from typing import Any

import lightning
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from datamodules.controls import MODALITIES
from datamodules.sample import SAMPLE_ERRORS, SampleLoader, check_fits, collate
from datamodules.shards import (
    SHARD_ERRORS,
    SampleRef,
    Split,
    count_samples,
    expand_shards,
    iter_tar_samples,
    probe_shards,
    read_samples,
    seeded_rng,
)

__all__ = ["MAX_CONSECUTIVE_FAILURES", "SAMPLE_ERRORS", "VideoDataModule", "collate"]

log = logging.getLogger(__name__)

MAX_CONSECUTIVE_FAILURES = 1000


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    if info is None:
        return 0, 1
    # No cv2.setNumThreads here: in a worker forked from a process whose OpenCV thread pool
    # is running, it waits forever for the pool's threads (which fork did not copy).
    return info.id, info.num_workers


class _Failures:
    """Counts broken samples; raises once a worker only meets failures."""

    def __init__(self, where: str):
        self.where, self.skipped, self.consecutive, self.logged = where, 0, 0, 0

    def fail(self, url: str, what: str, err: BaseException, count: bool = True) -> None:
        self.skipped += int(count)
        self.consecutive += 1
        if self.logged < 10:
            log.warning("%s: skipping %s of %s (%s: %s)", self.where, what, url, type(err).__name__, err)
            self.logged += 1
        if self.consecutive >= MAX_CONSECUTIVE_FAILURES:
            raise RuntimeError(
                f"{self.where}: {self.consecutive} consecutive broken samples or shards, the last"
                f" in shard {url} ({type(err).__name__}: {err}); is the data readable with these settings?"
            )

    def ok(self) -> None:
        self.consecutive = 0

    def report(self, n: int) -> None:
        """Count `n` broken samples the probe found (left out of the split, never read)."""
        self.skipped += n

    def take(self) -> int:
        n, self.skipped = self.skipped, 0
        return n


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------


class _TrainDataset(IterableDataset):
    """The training stream of one rank; `set_epoch` before each iteration (see module doc)."""

    def __init__(
        self,
        loader: SampleLoader,
        urls: list[str],
        split: Split,
        batch_size: int,
        batches_per_epoch: int,
        seed: int,
        rank: int,
        world: int,
        resample: bool,
    ):
        self.loader, self.urls, self.split, self.batch_size = loader, urls, split, batch_size
        self.batches_per_epoch, self.seed, self.rank, self.world = batches_per_epoch, seed, rank, world
        self.resample = resample
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Iterate epoch `epoch` from its batch `start_batch` (the ones before were delivered)."""
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[dict]:
        actual, nw = _worker()
        b, bpe = self.start_batch, self.batches_per_epoch
        w = (actual + b) % nw  # the logical worker whose next batch is the rank's batch b
        quota = bpe // nw + (w < bpe % nw)
        done = b // nw + (w < b % nw)  # batches of logical worker w among the first b
        if quota - done <= 0:
            return
        yield from self._batches(w, nw, quota, done)

    def _refs(self, w: int, nw: int, quota: int) -> Iterator[SampleRef]:
        """The samples of logical worker w's `quota` batches, in order (see module doc)."""
        n = quota * self.batch_size
        if self.resample:
            return islice(self.split.resampled(self.seed, self.epoch, self.rank, w), n)
        bpe = self.batches_per_epoch
        first = self.rank * bpe + w * (bpe // nw) + min(w, bpe % nw)  # the worker's first batch
        start = first * self.batch_size
        return self.split.refs(self.seed, self.epoch, start, start + n)

    def _rng(self, ref: SampleRef, w: int, spare: int) -> random.Random:
        """The sample's random stream: a function of the sample and the epoch (and the pass)."""
        if self.resample:
            return seeded_rng(self.seed, "resample", self.epoch, self.rank, w, ref.cycle, ref.shard, ref.index, spare)
        extra = ("spare", spare) if spare else ()
        return seeded_rng(self.seed, "sample", self.epoch, ref.cycle, ref.shard, ref.index, *extra)

    def _read(self, refs: Iterable[SampleRef]) -> Iterator[tuple[SampleRef, dict | BaseException]]:
        """Each ref with its raw sample, or with why it could not be read (one read per run of
        refs into the same shard and pass, from its first sample to its last)."""
        for _, run in groupby(refs, key=lambda r: (r.shard, r.cycle)):
            run = list(run)
            url, pos = self.urls[run[0].shard], 0
            error: BaseException = ValueError("the shard holds fewer samples than its probe (changed since?)")
            try:
                for index, raw in read_samples(url, [r.index for r in run]):
                    while pos < len(run) and run[pos].index < index:
                        yield run[pos], error
                        pos += 1
                    if pos < len(run) and run[pos].index == index:
                        yield run[pos], raw
                        pos += 1
            except SHARD_ERRORS as e:
                error = e
            for ref in run[pos:]:
                yield ref, error

    def _batches(self, w: int, nw: int, quota: int, done: int) -> Iterator[dict]:
        where = f"train worker {w} of rank {self.rank} (epoch {self.epoch})"
        fails = _Failures(where)
        remaining, batch = quota - done, []
        # pass 0: the worker's samples after the `done` batches delivered; passes 1, 2, ...
        # (only after samples that failed to load): its samples again, to fill its quota
        for spare in count():
            refs = self._refs(w, nw, quota)
            if spare == 0:
                refs = islice(refs, done * self.batch_size, None)
            good = 0
            for ref, raw in self._read(refs):
                if spare == 0:
                    fails.report(ref.broken)
                url = self.urls[ref.shard]
                if isinstance(raw, BaseException):
                    fails.fail(url, f"sample {ref.index}", raw, count=spare == 0)
                    continue
                try:
                    sample = self.loader(raw, self._rng(ref, w, spare))
                    check_fits(batch, sample)
                except SAMPLE_ERRORS as e:
                    fails.fail(url, f"sample {raw['__key__']!r}", e, count=spare == 0)
                    continue
                fails.ok()
                good += 1
                batch.append(sample)
                if len(batch) == self.batch_size:
                    yield collate(batch, fails.take())
                    batch = []
                    remaining -= 1
                    if remaining == 0:
                        return
            if spare > 0 and good == 0:
                shards = sorted({self.urls[r.shard] for r in self._refs(w, nw, quota)})
                raise RuntimeError(f"{where}: a full pass over its samples in {shards} gave no usable sample")


class _ValDataset(IterableDataset):
    """Validation batches of one rank: fixed sample indices, fixed clips (see module doc)."""

    def __init__(self, loader: SampleLoader, urls: list[str], indices: list[int], batch_size: int, rank: int):
        self.loader, self.urls, self.indices = loader, urls, indices
        self.batch_size, self.rank = batch_size, rank

    def __len__(self) -> int:
        return math.ceil(len(self.indices) / self.batch_size)

    def __iter__(self) -> Iterator[dict]:
        wid, nw = _worker()
        chunks = [self.indices[i : i + self.batch_size] for i in range(0, len(self.indices), self.batch_size)]
        mine = chunks[wid::nw]
        if not mine:
            return
        raws = self._read(sorted(set(self.indices)))
        order = list(dict.fromkeys(self.indices))  # the rank's distinct samples, for replacements
        fails = _Failures(f"val worker {wid} of rank {self.rank}")
        for chunk in mine:
            batch = []
            for idx in chunk:
                pos = order.index(idx)
                for attempt in range(len(order)):
                    cand = order[(pos + attempt) % len(order)]
                    raw = raws.get(cand)
                    if raw is None:
                        continue
                    try:
                        sample = self.loader(raw, None)
                        check_fits(batch, sample)
                    except SAMPLE_ERRORS as e:
                        fails.fail(raw["__url__"], f"validation sample {raw['__key__']!r}", e)
                        continue
                    fails.ok()
                    batch.append(sample)
                    break
                else:
                    raise RuntimeError(f"every validation sample of rank {self.rank} is broken ({self.urls})")
            yield collate(batch, fails.take())

    def _read(self, wanted: list[int]) -> dict[int, dict]:
        """Raw samples by global index (the first samples of the shards in listed order)."""
        out: dict[int, dict] = {}
        base, todo = 0, set(wanted)
        for url in self.urls:
            if not todo:
                break
            n = count_samples(url)
            if not any(base <= i < base + n for i in todo):
                base += n
                continue
            try:
                for i, raw in enumerate(iter_tar_samples(url), start=base):
                    if i in todo:
                        out[i] = raw
                        todo.discard(i)
            except SHARD_ERRORS as e:
                log.warning("validation shard %s is damaged (%s: %s)", url, type(e).__name__, e)
            base += n
        return out


def val_indices(total: int, rank: int, world: int) -> list[int]:
    """Global sample indices of `rank`: a contiguous range of ceil(total / world), padded
    by repeating its own samples (or, for an empty range, wrapping over all samples)."""
    per = math.ceil(total / world)
    own = list(range(rank * per, min((rank + 1) * per, total)))
    if not own:
        return [(rank * per + i) % total for i in range(per)]
    return [own[i % len(own)] for i in range(per)]


class _EpochLoader(DataLoader):
    """A DataLoader that, on each ``iter()``, asks `begin` for ``(epoch, start_batch)`` and
    sets them on its dataset before the workers start."""

    def __init__(self, dataset: _TrainDataset, begin: Callable[[], tuple[int, int]], **kwargs: Any):
        super().__init__(dataset, **kwargs)
        self._begin = begin

    def __iter__(self):
        self.dataset.set_epoch(*self._begin())
        return super().__iter__()


# --------------------------------------------------------------------------------------------
# The datamodule
# --------------------------------------------------------------------------------------------


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
            raise RuntimeError(
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
        ds = _TrainDataset(
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
        return _EpochLoader(ds, self._begin_stream, **self._dataloader_kwargs())

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
        ds = _ValDataset(
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
