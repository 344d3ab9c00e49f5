"""Shard lists, raw tar reading, sample counting, the probe of every sample and the epoch split.

Everything here works on *raw* samples: ``dict`` of ``{"__key__", "__url__", ext: bytes}``
grouped from consecutive tar members with the same key, exactly as webdataset groups them
(key = member path up to the first dot of its base name, extension = the rest, lower-cased:
``abc.edge.mp4`` -> key ``abc``, ext ``edge.mp4``). Nothing is decoded here (the probe's
`check` is the caller's), so passing over a sample costs reading its bytes past at most (a local
shard is seeked past), never decoding it.

Shards are opened with ``webdataset.gopen``, so besides local paths the usual webdataset URLs
(``pipe:...``, ``http(s)://``, ...) work too.

Probe (`probe_shards`): every sample of every shard is read once and handed to a check (the
loader's, `datamodules.sample.SampleLoader.check`: members and container headers, no frames
decoded), giving per shard its sample count and its broken samples. Results are cached in memory
and as one small JSON file per shard in `probe_cache_dir`, keyed by the shard's absolute path,
size and mtime (a remote shard: its URL alone) and the check's requirements.

Split (`Split`): the good samples of epoch ``e``, pass ``c``, are the shards in a
``random.Random((seed, e[, c]))`` order, each shard's good samples in shard order; passes 1, 2,
... follow pass 0 where more positions are asked for. A reader asks for a range of positions
(`Split.refs`) and gets (shard, sample index) references, so it reads only the few shards its
range covers, from the first sample it needs to the last. Each broken sample of pass 0 is
reported with the good sample that follows it in that order (those after the last good sample
with that one): the positions of pass 0 report every broken sample exactly once. Everything is
a function of (seed, epoch, the probes): every rank and worker computes it alone.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import random
import re
import tarfile
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

from braceexpand import braceexpand  # a dependency of webdataset
from webdataset import gopen

__all__ = [
    "PROBE_CACHE_ENV",
    "SHARD_ERRORS",
    "SampleRef",
    "ShardProbe",
    "Split",
    "count_samples",
    "expand_shards",
    "iter_tar_samples",
    "probe_cache_dir",
    "probe_shard",
    "probe_shards",
    "read_samples",
    "seeded_rng",
    "split_name",
]

log = logging.getLogger(__name__)

# What reading a damaged or missing shard raises (the reader skips the rest of that shard).
SHARD_ERRORS = (tarfile.TarError, OSError, EOFError)

_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta
_COUNTS: dict[tuple, int] = {}  # sample counts per shard, see `count_samples`
_PROBES: dict[str, ShardProbe] = {}  # probes per shard and requirements, see `probe_shard`
PROBE_CACHE_ENV = "VIDISTILL_PROBE_CACHE"
PROBE_THREADS = 4  # shards probed at once (reading tars, opening containers)


def seeded_rng(*parts: object) -> random.Random:
    """A ``random.Random`` seeded from the parts (stable across processes and machines:
    Python seeds from a str through SHA-512, never through the salted ``hash``)."""
    return random.Random(":".join(str(p) for p in parts))


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def expand_shards(spec: str | os.PathLike | Sequence[str | os.PathLike] | None) -> list[str]:
    """The shard list of `spec`, in order.

    `spec` is a brace pattern (``"data/train-{000000..000009}.tar"``), a glob, a directory
    (every ``*.tar`` in it, sorted; with none there, every ``*/*.tar`` one level down, which is
    how per-rank writers such as make-kd-data lay out their output), a URL, or a list of any of these
    (concatenated in order).
    Local paths must exist (FileNotFoundError names the missing one); an empty result raises
    ValueError.
    """
    if spec is None:
        return []
    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    urls: list[str] = []
    for item in items:
        item = os.fspath(item)
        if _is_local(item) and os.path.isdir(item):
            found = sorted(glob.glob(os.path.join(glob.escape(item), "*.tar")))
            found = found or sorted(glob.glob(os.path.join(glob.escape(item), "*", "*.tar")))
            if not found:
                raise ValueError(f"no *.tar shards in directory {item!r}")
            urls += found
            continue
        for url in braceexpand(item):
            if not _is_local(url):
                urls.append(url)
            elif glob.has_magic(url):
                found = sorted(glob.glob(url))
                if not found:
                    raise FileNotFoundError(f"no shards match {url!r}")
                urls += found
            elif os.path.exists(url):
                urls.append(url)
            else:
                raise FileNotFoundError(f"shard {url!r} does not exist (from {item!r})")
    if not urls:
        raise ValueError(f"no shards in {spec!r}")
    return urls


def check_tars(urls: Sequence[str]) -> None:
    """ValueError naming the first local shard that is no tar (an empty or truncated file), so a
    command reading them stops in one line before it writes anything."""
    for url in urls:
        if not _is_local(url):
            continue
        try:
            with tarfile.open(url, "r:"):
                pass
        except (tarfile.TarError, OSError) as err:
            size = os.path.getsize(url) if os.path.isfile(url) else 0
            raise ValueError(f"{url}: not a readable tar file ({size} bytes: {err.args[0]})") from None


def split_name(name: str) -> tuple[str, str] | None:
    """``(key, ext)`` of a tar member name, or None for names webdataset would skip."""
    if _META.match(name):
        return None
    m = _NAME.match(name)
    if not m:
        return None
    return m.group(1), m.group(2).lower()


def iter_tar_samples(url: str, indices: Sequence[int] | None = None) -> Iterator[dict]:
    """Raw samples of the shard at `url`: ``{"__key__", "__url__", ext: bytes, ...}``.

    indices: only the samples at these (ascending) positions in the shard, and the reading stops
    after the last of them (the others are passed over without reading their bytes where the
    shard is a local file); None: every sample. Raises one of `SHARD_ERRORS` for an unreadable
    or damaged shard (the samples before the damage have been yielded).
    """
    for _, raw in read_samples(url, indices):
        yield raw


def read_samples(url: str, indices: Sequence[int] | None = None) -> Iterator[tuple[int, dict]]:
    """`iter_tar_samples` with each sample's position in the shard: ``(index, raw)``."""
    wanted = None if indices is None else set(indices)
    last = -1 if wanted is None else max(wanted, default=-1)
    if wanted is not None and last < 0:
        return
    if wanted is not None and _is_local(url):
        tar = tarfile.open(url, mode="r:*")  # random access: seeks past the samples not wanted
        stream = None
    else:
        stream = gopen(url, "rb")
    try:
        if stream is not None:
            tar = tarfile.open(fileobj=stream, mode="r|*")
        with tar:
            index, current, key = -1, None, None
            for member in tar:
                if not member.isfile():
                    continue
                split = split_name(member.name)
                if split is None:
                    continue
                if split[0] != key:  # a new sample starts
                    if current is not None:
                        yield index, current
                        if index == last:
                            return
                    key, index, current = split[0], index + 1, None
                    if wanted is None or index in wanted:
                        current = {"__key__": key, "__url__": url}
                if current is not None:
                    f = tar.extractfile(member)
                    current[split[1]] = f.read() if f is not None else b""
            if current is not None:
                yield index, current
                if index == last:
                    return
            _check_end(tar)
    finally:
        if stream is not None:
            stream.close()


def _check_end(tar: tarfile.TarFile) -> None:
    """Raise if member data follows where the archive ended: tarfile ends a stream silently at an
    invalid member header, which would drop the rest of the shard uncounted. A whole shard has
    only zero blocks after its last member."""
    while chunk := tar.fileobj.read(1 << 20):
        if chunk.count(0) != len(chunk):
            raise tarfile.ReadError(f"invalid tar header near byte {tar.offset}: the rest of the shard is unreadable")


def count_samples(url: str) -> int:
    """Number of samples in a shard, from its member names only (nothing decoded).

    Cached in memory per process, keyed by path, size and mtime for local files (by URL for
    remote ones). A damaged shard counts the samples before the damage (with a warning).
    """
    if _is_local(url):
        st = os.stat(url)
        cache_key: tuple = (os.path.abspath(url), st.st_size, st.st_mtime_ns)
    else:
        cache_key = (url,)
    if cache_key in _COUNTS:
        return _COUNTS[cache_key]
    n, key = 0, None
    try:
        if _is_local(url):
            tar = tarfile.open(url, mode="r:*")  # random access: seeks past member data
        else:
            tar = tarfile.open(fileobj=gopen(url, "rb"), mode="r|*")
        with tar:
            for member in tar:
                split = split_name(member.name) if member.isfile() else None
                if split is not None and split[0] != key:
                    key, n = split[0], n + 1
    except SHARD_ERRORS as e:
        log.warning("shard %s is damaged (%s: %s); counted the %d samples before it", url, type(e).__name__, e, n)
    _COUNTS[cache_key] = n
    return n


# --------------------------------------------------------------------------------------------
# Probing: which samples of a shard are good
# --------------------------------------------------------------------------------------------


class ShardProbe(NamedTuple):
    """A shard's samples as the loader sees them: `count` samples, `bad` the broken ones
    (index -> ``"key: why"``). A damaged shard's unreadable rest counts as one broken sample."""

    count: int
    bad: dict[int, str]


def probe_cache_dir() -> str | None:
    """Where probes are cached on disk: ``$VIDISTILL_PROBE_CACHE`` ("" or "off": nowhere), else
    ``$XDG_CACHE_HOME/vidistill/probe`` (``~/.cache/vidistill/probe``)."""
    value = os.environ.get(PROBE_CACHE_ENV)
    if value is not None:
        return None if value.strip().lower() in ("", "0", "off", "none") else value
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "vidistill", "probe")


def _shard_key(url: str) -> list:
    if _is_local(url):
        st = os.stat(url)
        return [os.path.abspath(url), st.st_size, st.st_mtime_ns]
    return [url]


def _cache_file(key: list) -> str | None:
    folder = probe_cache_dir()
    if folder is None:
        return None
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:40]
    return os.path.join(folder, f"{digest}.json")


def _read_cached(key: list) -> ShardProbe | None:
    path = _cache_file(key)
    if path is None:
        return None
    try:
        with open(path) as f:
            data = json.load(f)
        if data["key"] != key:
            return None
        return ShardProbe(int(data["count"]), {int(i): str(why) for i, why in data["bad"]})
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_cached(key: list, probe: ShardProbe) -> None:
    path = _cache_file(key)
    if path is None:
        return
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "w") as f:
            json.dump({"key": key, "count": probe.count, "bad": sorted(probe.bad.items())}, f)
        os.replace(tmp, path)  # atomic: ranks probing the same shard never see half a file
    except OSError as e:
        log.debug("could not cache the probe of %s in %s (%s)", key[0], path, e)
        with contextlib.suppress(OSError):
            os.remove(tmp)


def probe_shard(url: str, check: Callable[[dict], str | None], requirements: str) -> ShardProbe:
    """Read every sample of the shard once and ask `check` (None: good, else why it is broken).

    Cached in memory and on disk (`probe_cache_dir`) under the shard's path, size and mtime (a
    remote shard: its URL) and `requirements` (what `check` depends on), so a changed shard or
    changed requirements are probed again. A damaged shard is probed again each time (its
    damage may be a failed download)."""
    key = [*_shard_key(url), requirements]
    mem = json.dumps(key)
    if mem in _PROBES:
        return _PROBES[mem]
    cached = _read_cached(key)
    if cached is not None:
        _PROBES[mem] = cached
        return cached
    n, bad, damaged = 0, {}, False
    try:
        for i, raw in read_samples(url):
            n = i + 1
            why = check(raw)
            if why is not None:
                bad[i] = f"{raw['__key__']}: {why}"[:300]
    except SHARD_ERRORS as e:
        log.warning("shard %s is damaged after %d samples (%s: %s)", url, n, type(e).__name__, e)
        bad[n] = f"(damaged shard after sample {n}): {type(e).__name__}: {e}"[:300]
        n, damaged = n + 1, True
    probe = ShardProbe(n, bad)
    _PROBES[mem] = probe
    if not damaged:
        _write_cached(key, probe)
    return probe


def probe_shards(
    urls: Sequence[str],
    check: Callable[[dict], str | None],
    requirements: str,
    rank: int = 0,
    world: int = 1,
    threads: int = PROBE_THREADS,
) -> list[ShardProbe]:
    """`probe_shard` of every shard, in `threads` threads. Rank r starts at shard r * n / world
    and wraps around, so ranks sharing a cache folder mostly find the others' shards done."""
    n = len(urls)
    start = rank * n // max(1, world)
    order = [*range(start, n), *range(start)]
    if threads <= 1 or n <= 1:
        found = {i: probe_shard(urls[i], check, requirements) for i in order}
    else:
        with ThreadPoolExecutor(min(threads, n)) as pool:
            found = dict(zip(order, pool.map(lambda i: probe_shard(urls[i], check, requirements), order)))
    return [found[i] for i in range(n)]


# --------------------------------------------------------------------------------------------
# The epoch split
# --------------------------------------------------------------------------------------------


class SampleRef(NamedTuple):
    """One position of an epoch's sequence: sample `index` of shard `shard` (its place in the
    shard list), in pass `cycle` over the data; `broken` broken samples are reported with it."""

    shard: int
    index: int
    cycle: int
    broken: int = 0


class Split:
    """The good samples of a shard list and each epoch's sequence of them (see the module doc).

    counts: samples per shard; bad: per shard, the indices of its broken samples."""

    def __init__(self, counts: Sequence[int], bad: Sequence[Iterable[int]]):
        self.counts = [int(c) for c in counts]
        self.bad = [tuple(sorted(set(b))) for b in bad]
        outside = any(b and (b[0] < 0 or b[-1] >= c) for c, b in zip(self.counts, self.bad))
        if len(self.counts) != len(self.bad) or outside:
            raise ValueError("bad indices must lie within their shard's count")
        self.good = [c - len(b) for c, b in zip(self.counts, self.bad)]
        self.total = sum(self.good)
        self.broken = sum(map(len, self.bad))

    @classmethod
    def from_probes(cls, probes: Sequence[ShardProbe]) -> Split:
        return cls([p.count for p in probes], [p.bad.keys() for p in probes])

    def order(self, seed: int, epoch: int, cycle: int = 0) -> list[int]:
        """The shards in the order of pass `cycle` of epoch `epoch`."""
        perm = list(range(len(self.counts)))
        seeded_rng(seed, "epoch", epoch, *(("cycle", cycle) if cycle else ())).shuffle(perm)
        return perm

    def refs(self, seed: int, epoch: int, start: int, stop: int) -> Iterator[SampleRef]:
        """Positions ``start:stop`` of epoch `epoch`'s sequence: pass 0 over the good samples
        (shards in `order`, samples in shard order), then pass 1, ... as far as needed. In pass
        0 each broken sample is reported with the good sample after it (those after the last
        good sample with that one), so the positions of pass 0 report every broken one once."""
        if self.total == 0:
            raise ValueError("no good samples to split")
        cycle = start // self.total
        pos = cycle * self.total
        while pos < stop:
            order = self.order(seed, epoch, cycle)
            carry_in, last = self._carries(order) if cycle == 0 else ({}, (-1, 0))
            for s in order:
                a, b = max(start, pos), min(stop, pos + self.good[s])
                if a < b:
                    tail = last[1] if s == last[0] else 0
                    yield from self._shard_refs(s, cycle, a - pos, b - pos, carry_in.get(s, 0), tail, cycle == 0)
                pos += self.good[s]
                if pos >= stop:
                    return
            cycle += 1

    def _carries(self, order: list[int]) -> tuple[dict[int, int], tuple[int, int]]:
        """Broken samples of earlier shards reported with each shard's first good sample, and
        (the last shard with a good sample, the broken ones after that sample)."""
        carry_in, carry, last = {}, 0, -1
        for s in order:
            if self.good[s] == 0:
                carry += self.counts[s]
                continue
            carry_in[s], last = carry, s
            good_last = self._nth_good(s, self.good[s] - 1)
            carry = self.counts[s] - 1 - good_last
        return carry_in, (last, carry)

    def _nth_good(self, s: int, k: int) -> int:
        """The index of the k-th good sample of shard s."""
        i = k
        for b in self.bad[s]:  # ascending: each bad index at or before the candidate shifts it
            if b <= i:
                i += 1
            else:
                break
        return i

    def _shard_refs(
        self, s: int, cycle: int, first: int, stop: int, carry_in: int, tail: int, report: bool
    ) -> Iterator[SampleRef]:
        """Good samples ``first:stop`` of shard s; with `report`, each carries the broken ones
        before it (the first also `carry_in`, the last also `tail`)."""
        bad, k, pending = set(self.bad[s]), 0, carry_in
        for i in range(self.counts[s]):
            if i in bad:
                pending += 1
                continue
            if first <= k < stop:
                broken = pending + (tail if k == self.good[s] - 1 else 0)
                yield SampleRef(s, i, cycle, broken if report else 0)
            pending, k = 0, k + 1
            if k >= stop:
                return

    def resampled(self, seed: int, epoch: int, *stream: object) -> Iterator[SampleRef]:
        """Endless draws (with replacement, seeded by `stream`) of a shard with good samples,
        each draw's good samples in shard order; each draw reports its shard's broken ones."""
        rng = seeded_rng(seed, "resample", epoch, *stream)
        usable = [s for s in range(len(self.counts)) if self.good[s]]
        if not usable:
            raise ValueError("no good samples to draw")
        draw = 0
        while True:
            s = rng.choice(usable)
            last = self._nth_good(s, self.good[s] - 1)
            yield from self._shard_refs(s, draw, 0, self.good[s], 0, self.counts[s] - 1 - last, True)
            draw += 1
