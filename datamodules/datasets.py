"""The datasets behind VideoDataModule (datamodules/video.py says what they deliver and how an
epoch is split): `TrainDataset` streams one rank's share of an epoch's good samples as
fixed-size batches, `ValDataset` a rank's fixed validation range, `EpochLoader` starts each
epoch's stream at the datamodule's position (exact resume).
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Iterable, Iterator
from itertools import count, groupby, islice
from typing import Any

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from datamodules.sample import SAMPLE_ERRORS, SampleLoader, check_fits, collate
from datamodules.shards import (
    SHARD_ERRORS,
    SampleRef,
    Split,
    count_samples,
    iter_tar_samples,
    read_samples,
    seeded_rng,
)

log = logging.getLogger("datamodules.video")

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


class TrainDataset(IterableDataset):
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


class ValDataset(IterableDataset):
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


class EpochLoader(DataLoader):
    """A DataLoader that, on each ``iter()``, asks `begin` for ``(epoch, start_batch)`` and
    sets them on its dataset before the workers start."""

    def __init__(self, dataset: TrainDataset, begin: Callable[[], tuple[int, int]], **kwargs: Any):
        super().__init__(dataset, **kwargs)
        self._begin = begin

    def __iter__(self):
        self.dataset.set_epoch(*self._begin())
        return super().__iter__()


# --------------------------------------------------------------------------------------------
# The datamodule
# --------------------------------------------------------------------------------------------
