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
  get ones)
- ``caption`` list[str], ``key`` list[str], ``fps`` float32 (B,) (the clip's rate:
  ``target_fps``, else the source fps / ``stride``)
- ``text_emb`` (B, L, D) + ``text_mask`` bool (B, L) with ``use_text_embeddings`` (shorter
  embeddings are zero-padded to the batch's longest, mask False there)
- ``latent`` (B, C, T', H', W') with ``use_latents``
- ``kd_noise``, ``kd_states``, ``kd_t`` with ``use_kd`` (see its argument)
- ``skipped`` int64 scalar: broken samples this worker skipped since its previous batch

Training stream, per epoch ``e`` (exact; see `datamodules.shards` for the shard assignment):
slot ``rank * W + worker`` (W = DataLoader workers, at least 1) reads its shards of the
``(seed, e)`` permutation; each rank yields exactly ``batches_per_epoch`` batches, the first
``batches_per_epoch % W`` workers one more than the others, so the DataLoader's round-robin
gives batch ``j`` from worker ``j % W``. A worker whose shards run out first reads them again
in a new order (seeded by the cycle number); with ``resample`` it draws shards from the whole
list with replacement instead. The random clip start (and the random control parameters) of a
sample come from ``random.Random`` seeded by (seed, epoch, rank, worker, raw-sample counter).

Epoch mechanism: the train DataLoader is an `_EpochLoader` whose ``__iter__`` asks the
datamodule which epoch and batch to start at and hands them to the dataset (``set_epoch``)
before the workers start; the epoch is ``trainer.current_epoch`` (or `set_epoch` without a
Trainer), unless a loaded state says otherwise. This works with Lightning's default
``reload_dataloaders_every_n_epochs=0`` (the same loader is iterated once per epoch) and with
reloading. Workers are not persistent: each epoch's workers start with that epoch's state.

Resume: `state_dict` is ``{"epoch", "batches", "skipped_total"}`` (batches = delivered to
training on this rank this epoch, counted in `on_after_batch_transfer`; a LightningModule that
overrides that hook takes it over from the datamodule, then call this one from it). After
`load_state_dict` the next stream continues that epoch: every worker passes over the raw tar
samples of its share of the delivered batches without decoding them, and the workers' roles
are rotated so batch order continues exactly. Exact when world size and ``num_workers`` are
unchanged and no sample in the passed-over part was broken (each broken one there shifts the
worker's stream by one sample; counts and disjointness still hold). A state with the whole
epoch delivered continues at the next epoch.

Broken samples (undecodable, too short, no caption, control shorter than the clip, missing
required key, bad safetensors or json) are skipped and counted; damaged shards are skipped
with a warning. A worker stops with a RuntimeError naming its shards after
``MAX_CONSECUTIVE_FAILURES`` failures in a row, or after a full pass over its shards without
a usable sample, so it never spins forever.

Validation: the first ``val_samples`` samples of ``val_shards`` in the listed order, split
into contiguous per-rank ranges of ``ceil(N / world)`` samples; a shorter range is padded by
repeating its own samples from its start (ranges stay disjoint). Clips start at frame 0,
computed controls use ``control_preset`` (default "medium"), and a broken sample is replaced by
the next one of the rank's range, so every call yields the same batches.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from typing import Any

import lightning
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from datamodules.controls import MODALITIES
from datamodules.sample import SAMPLE_ERRORS, SampleLoader, check_fits, collate
from datamodules.shards import (
    SHARD_ERRORS,
    Entry,
    count_samples,
    entry_count,
    expand_shards,
    iter_tar_samples,
    seeded_rng,
    worker_entries,
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
        batch_size: int,
        batches_per_epoch: int,
        seed: int,
        rank: int,
        world: int,
        resample: bool,
    ):
        self.loader, self.urls, self.batch_size = loader, urls, batch_size
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
        remaining = quota - done
        if remaining <= 0:
            return
        yield from self._batches(w, nw, remaining, skip=done * self.batch_size)

    def _entries(self, w: int, nw: int) -> Iterator[Entry | None]:
        """The worker's shards forever; None marks the end of each pass over them."""
        if self.resample:
            rng = seeded_rng(self.seed, "resample", self.epoch, self.rank, w)
            while True:
                yield Entry(rng.choice(self.urls))
        mine = worker_entries(self.urls, self.seed, self.epoch, self.rank, self.world, w, nw)
        cycle = 0
        while True:
            order = list(mine)
            if cycle:
                seeded_rng(self.seed, "cycle", self.epoch, self.rank, w, cycle).shuffle(order)
            yield from order
            yield None
            cycle += 1

    def _batches(self, w: int, nw: int, remaining: int, skip: int) -> Iterator[dict]:
        where = f"train worker {w} of rank {self.rank} (epoch {self.epoch})"
        fails = _Failures(where)
        counter = 0  # raw samples read (or passed over) by this logical worker this epoch
        batch: list[dict] = []
        good_in_pass = ff_in_pass = 0
        seen: list[str] = []
        for entry in self._entries(w, nw):
            if entry is None:
                if good_in_pass == 0 and ff_in_pass == 0:
                    raise RuntimeError(f"{where}: a full pass over its shards {seen} gave no usable sample")
                good_in_pass = ff_in_pass = 0
                continue
            if entry.url not in seen:
                seen.append(entry.url)
            first = 0
            if skip:  # resume fast-forward: pass over whole shards by their counts, then samples
                n = entry_count(entry)
                if n == 0:
                    fails.fail(entry.url, "an empty shard", ValueError("no samples"), count=False)
                    continue
                if skip >= n:
                    skip, counter, ff_in_pass = skip - n, counter + n, ff_in_pass + n
                    continue
                first, skip, counter, ff_in_pass = skip, 0, counter + skip, ff_in_pass + skip
            got = 0
            try:
                for raw in iter_tar_samples(entry.url, first, entry.part, entry.parts):
                    got += 1
                    rng = seeded_rng(self.seed, "sample", self.epoch, self.rank, w, counter)
                    counter += 1
                    try:
                        sample = self.loader(raw, rng)
                        check_fits(batch, sample)
                    except SAMPLE_ERRORS as e:
                        fails.fail(entry.url, f"sample {raw['__key__']!r}", e)
                        continue
                    fails.ok()
                    good_in_pass += 1
                    batch.append(sample)
                    if len(batch) == self.batch_size:
                        yield collate(batch, fails.take())
                        batch = []
                        remaining -= 1
                        if remaining == 0:
                            return
            except SHARD_ERRORS as e:
                fails.fail(entry.url, "the rest of the shard", e)
                continue
            if got == 0 and first == 0:
                fails.fail(entry.url, "an empty shard", ValueError("no samples"), count=False)


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
            batches_per_epoch: batches per rank and epoch; None: floor(samples in the train
                shards / (world_size * batch_size)), at least 1.
            resample: each worker draws shards with replacement (seeded) instead of reading its
                disjoint share of the epoch's permutation.
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
        self._val_urls: list[str] | None = None
        self._bpe: int | None = None
        self._epoch = 0  # set_epoch, for use without a Trainer
        self._stream = (0, 0)  # (epoch, batches delivered) of the current training stream
        self._resume: tuple[int, int] | None = None
        self._skipped_base = 0
        self._skipped_acc: torch.Tensor | None = None  # summed on the batch's device, no sync
        self._warned_few_shards = False

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
            if self.batches_per_epoch is not None:
                self._bpe = self.batches_per_epoch
            else:
                total = sum(count_samples(u) for u in self._train_urls)
                self._bpe = max(1, total // (self._world * self.batch_size))
        if stage in (None, "fit", "validate") and self.val_shards is not None:
            self._val_urls = expand_shards(self.val_shards)

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
        slots = self._world * max(1, self.num_workers)
        if len(self._train_urls) < slots and not self.resample and not self._warned_few_shards:
            log.warning(
                "%d train shards for %d ranks x workers: shards are shared (each reader takes every"
                " k-th sample of a shared shard); use at least %d shards for disjoint shards",
                len(self._train_urls),
                slots,
                slots,
            )
            self._warned_few_shards = True
        ds = _TrainDataset(
            self.loader,
            self._train_urls,
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
