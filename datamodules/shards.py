"""Shard lists, raw tar reading, sample counting and the per-epoch shard assignment.

Everything here works on *raw* samples: ``dict`` of ``{"__key__", "__url__", ext: bytes}``
grouped from consecutive tar members with the same key, exactly as webdataset groups them
(key = member path up to the first dot of its base name, extension = the rest, lower-cased:
``abc.edge.mp4`` -> key ``abc``, ext ``edge.mp4``). Nothing is decoded here, so skipping a
sample (resume fast-forward) costs reading its bytes past, never decoding them.

Shards are opened with ``webdataset.gopen``, so besides local paths the usual webdataset URLs
(``pipe:...``, ``http(s)://``, ...) work too.

Epoch assignment (`worker_entries`): epoch ``e`` shuffles the shard list with a
``random.Random`` seeded from ``(seed, e)``; slot ``s = rank * num_workers + worker`` of the
``world * num_workers`` slots takes ``perm[s::slots]``. With at least as many shards as
slots the slots' shards are disjoint (no wrap is needed: the per-rank batch quota, not the
shard count, makes ranks equal). With fewer shards than slots the permutation is wrapped
(repeated) to exactly ``slots`` entries; a shard that lands in ``k`` slots is then read by all
``k`` of them, each taking every ``k``-th sample of it (its occurrence ``i`` takes samples
``i::k``), so samples stay disjoint across ranks x workers even then.
"""

from __future__ import annotations

import glob
import logging
import os
import random
import re
import tarfile
from collections.abc import Iterator, Sequence
from typing import NamedTuple

from braceexpand import braceexpand  # a dependency of webdataset
from webdataset import gopen

__all__ = [
    "SHARD_ERRORS",
    "Entry",
    "count_samples",
    "entry_count",
    "expand_shards",
    "iter_tar_samples",
    "seeded_rng",
    "split_name",
    "worker_entries",
]

log = logging.getLogger(__name__)

# What reading a damaged or missing shard raises (the reader skips the rest of that shard).
SHARD_ERRORS = (tarfile.TarError, OSError, EOFError)

_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta
_COUNTS: dict[tuple, int] = {}  # sample counts per shard, see `count_samples`


class Entry(NamedTuple):
    """One shard as one worker reads it: the samples ``part::parts`` of `url`."""

    url: str
    part: int = 0
    parts: int = 1


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


def split_name(name: str) -> tuple[str, str] | None:
    """``(key, ext)`` of a tar member name, or None for names webdataset would skip."""
    if _META.match(name):
        return None
    m = _NAME.match(name)
    if not m:
        return None
    return m.group(1), m.group(2).lower()


def iter_tar_samples(url: str, skip: int = 0, part: int = 0, parts: int = 1) -> Iterator[dict]:
    """Raw samples of the shard at `url`: ``{"__key__", "__url__", ext: bytes, ...}``.

    Only samples with index ``i % parts == part`` belong to this reader; the first `skip` of
    those are passed over without reading their bytes. Raises one of `SHARD_ERRORS` for an
    unreadable or damaged shard (the samples before the damage have been yielded).
    """
    stream = gopen(url, "rb")
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            index, mine, current = -1, 0, None
            key = None
            for member in tar:
                if not member.isfile():
                    continue
                split = split_name(member.name)
                if split is None:
                    continue
                if split[0] != key:  # a new sample starts
                    if current is not None:
                        yield current
                    key, index, current = split[0], index + 1, None
                    if index % parts == part:
                        if mine >= skip:
                            current = {"__key__": key, "__url__": url}
                        mine += 1
                if current is not None:
                    f = tar.extractfile(member)
                    current[split[1]] = f.read() if f is not None else b""
            if current is not None:
                yield current
            _check_end(tar)
    finally:
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


def entry_count(entry: Entry) -> int:
    """Number of samples `entry` reads: ``len(range(part, count_samples(url), parts))``."""
    return len(range(entry.part, count_samples(entry.url), entry.parts))


def worker_entries(
    urls: Sequence[str], seed: int, epoch: int, rank: int, world: int, worker: int, num_workers: int
) -> list[Entry]:
    """The shards slot ``rank * num_workers + worker`` reads in `epoch` (see the module doc)."""
    if not urls:
        raise ValueError("no shards to assign")
    slots = world * num_workers
    perm = list(urls)
    seeded_rng(seed, "epoch", epoch).shuffle(perm)
    if len(perm) >= slots:
        return [Entry(u) for u in perm[rank * num_workers + worker :: slots]]
    wrapped = [perm[i % len(perm)] for i in range(slots)]
    s = rank * num_workers + worker
    url = wrapped[s]
    # occurrence i of a shard (the slots i*n + j hold shard perm[j]) reads samples i::k
    occurrences = [i for i in range(slots) if i % len(perm) == s % len(perm)]
    return [Entry(url, occurrences.index(s), len(occurrences))]
