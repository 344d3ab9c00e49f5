"""Writing webdataset shards resumably and crash-safely (used by make-shards, encode-text,
make-kd-data and the synthetic datasets).

Each shard is written to ``name.tar.tmp`` and renamed when complete, so a file under a final name
is always whole; ``index.json`` is rewritten after every finished shard. Two writers:

* `write_shards`: a planned list of samples. Shard ``i`` always holds the same planned samples
  (``samples_per_shard`` consecutive ones of the sorted list). A rerun keeps every shard that
  index.json records with the same planned keys and options (or, with no index.json at all,
  every shard whose keys are the planned ones) and writes the rest.
* `add_to_shards`: existing shards with new members per sample, one output shard per input shard
  (encode-text). A rerun keeps every output shard index.json records with the same options.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .files import naming, write_text

__all__ = [
    "INDEX",
    "SkipSample",
    "TarOut",
    "add_to_shards",
    "config_digest",
    "member_exts",
    "output_names",
    "read_index",
    "read_tar_samples",
    "shard_name",
    "tar_keys",
    "write_index",
    "write_shards",
]

INDEX = "index.json"
CREATED_BY = "vidistill make-shards"
MTIME = 1_700_000_000  # fixed member mtime: the same samples give byte-identical shards

Members = list[tuple[str, bytes]]  # (extension, bytes) of one sample, in member order


class SkipSample(Exception):
    """Raised by a sample builder: leave this sample out (warned and counted by the reason)."""


# --------------------------------------------------------------------------------------------
# Tar and index primitives
# --------------------------------------------------------------------------------------------


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), MTIME, 0o644
    tar.addfile(info, io.BytesIO(data))


class TarOut:
    """A shard being written: members go to ``path + ".tmp"``; `commit` fsyncs and renames it."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        self.tmp = self.path + ".tmp"
        self._file = open(self.tmp, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)
        self.samples = 0

    def add_sample(self, key: str, members: Members) -> None:
        if "." in os.path.basename(key):
            raise ValueError(f"sample key {key!r} contains a dot (webdataset would split it there)")
        for ext, data in members:
            _add(self._tar, f"{key}.{ext}", data)
        self.samples += 1

    def add_member(self, name: str, data: bytes) -> None:
        _add(self._tar, name, data)

    def commit(self) -> int:
        """Finish the tar and move it under its final name; returns its size in bytes. A failed
        finish (a full disk fails the tar's last blocks or the fsync) removes the `.tmp`."""
        try:
            self._tar.close()
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
        except BaseException:
            self.abort()
            raise
        os.replace(self.tmp, self.path)
        return os.path.getsize(self.path)

    def abort(self) -> None:
        """Remove the `.tmp`, even when closing it fails (on a full disk it does)."""
        for close in (self._tar.close, self._file.close):
            try:
                close()
            except OSError:
                pass
        if os.path.exists(self.tmp):
            os.remove(self.tmp)


def tar_keys(path: str | os.PathLike) -> list[str]:
    """Sample keys of a local shard in order, from member names only (nothing is read)."""
    from datamodules.shards import split_name

    keys: list[str] = []
    with tarfile.open(path, mode="r:*") as tar:
        for member in tar:
            split = split_name(member.name) if member.isfile() else None
            if split is not None and (not keys or keys[-1] != split[0]):
                keys.append(split[0])
    return keys


def read_index(out: str | os.PathLike) -> dict | None:
    """``{out}/index.json`` as a dict, or None when there is none (or it is unreadable)."""
    path = Path(out) / INDEX
    if not path.is_file():
        return None
    try:
        index = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        warnings.warn(f"ignoring unreadable {path}: {e}", stacklevel=2)
        return None
    return index if isinstance(index, dict) and isinstance(index.get("shards"), list) else None


def write_index(out: str | os.PathLike, entries: Sequence[dict], **fields: Any) -> None:
    """Write ``{out}/index.json`` atomically: ``{"shards", "total", **fields}``."""
    entries = sorted(entries, key=lambda e: e["name"])
    index = {"shards": list(entries), "total": sum(e["samples"] for e in entries), **fields}
    write_text(Path(out) / INDEX, json.dumps(index, indent=1) + "\n")


def config_digest(*parts: Any) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Resumable writing of a planned list of samples
# --------------------------------------------------------------------------------------------


def write_shards(
    out: str | os.PathLike,
    keys: Sequence[str],
    build: Callable[[str], Members],
    samples_per_shard: int = 100,
    prefix: str = "train",
    config: dict | None = None,
    resume: bool = True,
    progress: bool = True,
    info: dict | None = None,
    created_by: str = CREATED_BY,
    skipped: dict[str, list[str]] | None = None,
) -> list[str]:
    """Write the samples ``keys`` (in order) as shards, resuming finished ones.

    Args:
        out: output folder (created).
        keys: sample keys, unique, without dots; shard ``i`` holds ``keys[i*n:(i+1)*n]``.
        build: key -> the sample's members ``[(ext, bytes), ...]``; raise `SkipSample` to leave
            it out (the shard then holds fewer samples).
        samples_per_shard: samples per shard (n).
        prefix: shard names are ``{prefix}-{index:06d}.tar``.
        config: everything besides the keys that decides the shards' content; a shard is
            only reused when it was written with the same keys and config.
        resume: reuse finished shards (see the module doc); False rewrites every shard.
        progress: show a progress bar.
        info: extra fields for index.json.
        created_by: index.json's ``created_by``.
        skipped: samples left out before planning, ``{reason: [names]}``; index.json's
            ``skipped`` counts them together with the `SkipSample` ones (per shard, so a
            resumed run still counts the skips of the shards it kept).

    Returns:
        The shard paths, in order.
    """
    _check_plan(keys, samples_per_shard, prefix)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    old = read_index(out)
    _check_prefix(out, old, prefix)
    n_shards = -(-len(keys) // samples_per_shard)
    plans = [list(keys[i * samples_per_shard : (i + 1) * samples_per_shard]) for i in range(n_shards)]
    names = [shard_name(prefix, i) for i in range(n_shards)]
    plan_ids = [config_digest(config, plan) for plan in plans]
    entries = _kept_shards(out, old, names, plans, plan_ids) if resume else {}
    _remove_leftovers(out, old, names, prefix)

    fields = dict(info or {}, prefix=prefix, samples_per_shard=samples_per_shard, created_by=created_by)
    before = {reason: len(names_) for reason, names_ in (skipped or {}).items() if names_}

    def save(complete: bool) -> None:
        counts = dict(before)
        for entry in entries.values():
            for reason, n in entry.get("skipped", {}).items():
                counts[reason] = counts.get(reason, 0) + n
        write_index(out, entries.values(), complete=complete, **fields, skipped=counts)

    if entries:
        print(f"resuming: {len(entries)} of {n_shards} shards are already complete in {out}")
    save(complete=len(entries) == n_shards)
    done_samples = sum(len(p) for n, p in zip(names, plans) if n in entries)
    bar = tqdm(total=len(keys), initial=done_samples, desc=f"shards -> {out}", unit="clip", disable=not progress)
    try:
        for name, plan, plan_id in zip(names, plans, plan_ids):
            if name in entries:
                continue
            entry, shard_skips = _write_plan(out / name, plan, build, bar)
            if entry is None:
                for reason, n in shard_skips.items():
                    before[reason] = before.get(reason, 0) + n
                warnings.warn(f"shard {name}: every sample was skipped; no file written", stacklevel=2)
                continue
            entries[name] = dict(entry, plan=plan_id) | ({"skipped": shard_skips} if shard_skips else {})
            save(complete=False)
    finally:
        bar.close()
    save(complete=True)
    return [str(out / n) for n in names if n in entries]


def _check_plan(keys: Sequence[str], samples_per_shard: int, prefix: str) -> None:
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if not keys:
        raise ValueError("no samples to write")
    if len(set(keys)) != len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})[:5]
        raise ValueError(f"sample keys are not unique: {dup}")
    if not prefix or "/" in prefix or "." in prefix:
        raise ValueError(f"prefix must be a plain name without '/' or '.', got {prefix!r}")


def _check_prefix(out: Path, old: dict | None, prefix: str) -> None:
    """One folder, one prefix: index.json describes one split."""
    if old is None:
        return
    others = sorted({e["name"] for e in old["shards"] if not str(e.get("name", "")).startswith(prefix + "-")})
    if others:
        raise ValueError(
            f"{out} already holds shards of another prefix ({others[0]}, ...); write each split to its own folder"
        )


def _kept_shards(
    out: Path, old: dict | None, names: list[str], plans: list[list[str]], plan_ids: list[str]
) -> dict[str, dict]:
    """The index entries of the finished shards a rerun keeps (see the module doc)."""
    old_entries = {e["name"]: e for e in (old or {}).get("shards", [])}
    entries: dict[str, dict] = {}
    for name, plan, plan_id in zip(names, plans, plan_ids):
        path = out / name
        if not path.is_file():
            continue
        entry = old_entries.get(name)
        if old is not None:
            if entry and entry.get("plan") == plan_id and entry.get("bytes") == path.stat().st_size:
                entries[name] = entry
        else:  # no index: a shard under its final name is complete; check it holds this plan
            try:
                found = tar_keys(path)
            except (tarfile.TarError, OSError):
                continue
            if found and set(found) <= set(plan):
                entries[name] = {"name": name, "samples": len(found), "bytes": path.stat().st_size, "plan": plan_id}
    return entries


def _remove_leftovers(out: Path, old: dict | None, names: list[str], prefix: str) -> None:
    """Shards of an earlier, longer run of this prefix and the temporary files of a crash."""
    for name in (e["name"] for e in (old or {}).get("shards", [])):
        if name not in names and (out / name).is_file():
            print(f"removing {out / name}: not part of this dataset any more")
            (out / name).unlink()
    for tmp in out.glob(f"{prefix}-*.tar.tmp"):
        tmp.unlink()


def _write_plan(
    path: Path, plan: list[str], build: Callable[[str], Members], bar: tqdm
) -> tuple[dict | None, dict[str, int]]:
    """Write one planned shard: its index entry (None when every sample was skipped and no file
    is left under `path`) and its `SkipSample` counts by reason."""
    writer = TarOut(path)
    shard_skips: dict[str, int] = {}
    try:
        for key in plan:
            try:
                members = build(key)
            except SkipSample as reason:
                shard_skips[str(reason) or "skipped"] = shard_skips.get(str(reason) or "skipped", 0) + 1
            else:
                writer.add_sample(key, members)
            bar.update(1)
    except OSError as err:
        writer.abort()
        raise naming(err, path, writer.tmp) from err
    except BaseException:
        writer.abort()
        raise
    if writer.samples == 0:
        writer.abort()
        if path.is_file():  # an older shard of that name is not this one
            path.unlink()
        return None, shard_skips
    samples = writer.samples
    try:
        size = writer.commit()
    except OSError as err:
        raise naming(err, path, writer.tmp) from err
    return {"name": path.name, "samples": samples, "bytes": size}, shard_skips


# --------------------------------------------------------------------------------------------
# Adding members to existing shards (encode-text)
# --------------------------------------------------------------------------------------------

Named = list[tuple[str, bytes]]  # (member name, bytes) of one sample, names and order as in the tar
Batch = list[tuple[str | None, Named]]  # consecutive samples of one shard; key None: members
# webdataset skips (e.g. __meta__ files), copied as they are
Add = Callable[[Batch, str], list[dict[str, bytes]]]


def read_tar_samples(url: str) -> Iterator[tuple[str | None, Named]]:
    """``(key, [(member name, bytes), ...])`` per sample of a shard, original names and order kept."""
    from datamodules.shards import split_name

    key, members = None, []
    with tarfile.open(url, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            f = tar.extractfile(member)
            data = f.read() if f is not None else b""
            split = split_name(member.name)
            k = split[0] if split is not None else None
            if k is not None and k != key:
                if members:
                    yield key, members
                key, members = k, []
            members.append((member.name, data))
    if members:
        yield key, members


def member_exts(key: str | None, members: Named) -> dict[str, bytes]:
    """A sample's members by lower-cased extension (as the datamodule sees them)."""
    from datamodules.shards import split_name

    out = {}
    for name, data in members:
        split = split_name(name)
        if split is not None and split[0] == key:
            out[split[1]] = data
    return out


def output_names(urls: Sequence[str]) -> list[str]:
    """File names of the output shards `add_to_shards` writes for `urls` (one per input, same name)."""
    names = [os.path.basename(u) for u in urls]
    if len(set(names)) != len(names):
        raise ValueError("input shards from different folders share file names; write them into separate folders")
    return names


def add_to_shards(
    urls: Sequence[str],
    out: str | os.PathLike,
    add: Add,
    config: dict,
    batch_size: int = 16,
    resume: bool = True,
    progress: bool = True,
    record: str = "encoded",
    created_by: str = "vidistill encode-text",
    counts: dict[str, int] | None = None,
) -> list[dict]:
    """Rewrite each input shard to ``out/<its name>`` with new members per sample, resumably.

    Every original member is copied byte for byte, in order; after a sample's members come the
    ones `add` gives it, which replace an original member of the same name. Each output shard is
    written to ``name.tar.tmp`` and renamed when complete, so `out` may be the input folder.

    Args:
        urls: input shards (local paths).
        out: output folder (created).
        add: ``(batch, shard path) -> [{member name: bytes}, ...]``, one dict per entry of the
            batch (ignored for key None); a batch is up to `batch_size` consecutive entries of one
            shard, the last of a shard possibly fewer.
        config: the options the members are made with; index.json records it under `record`
            and each shard's entry its digest, and a rerun keeps the shards of the same digest.
        batch_size: entries per `add` call.
        resume: keep the finished shards of an earlier run with the same `config`.
        progress: show a progress bar.
        record: index.json's key for `config` (and each entry's for its digest).
        created_by: index.json's ``created_by``.
        counts: index.json's ``skipped``, rewritten after every shard; `add` updates it.

    Returns:
        The index entries of every output shard.
    """
    names = output_names(urls)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = config_digest(config)
    old = read_index(out) or {}
    fields = _carried_fields(urls, old, record)
    fields.update(created_by=created_by, **{record: config})
    entries = {}
    if resume:
        for e in old.get("shards", []):
            path = out / e["name"]
            if e.get(record) == fingerprint and e["name"] in names and path.is_file():
                if path.stat().st_size == e.get("bytes"):
                    entries[e["name"]] = e
    counts = {} if counts is None else counts

    def save(complete: bool) -> None:
        write_index(out, entries.values(), complete=complete, **fields, skipped=dict(counts))

    todo = [(u, n) for u, n in zip(urls, names) if n not in entries]
    if entries:
        print(f"resuming: {len(entries)} of {len(urls)} shards are already complete in {out}")
    save(complete=not todo)
    for url, name in tqdm(todo, desc=f"add to shards -> {out}", unit="shard", disable=not progress):
        writer = TarOut(out / name)
        try:
            _add_members(writer, url, add, batch_size)
        except BaseException:
            writer.abort()
            raise
        samples = writer.samples
        entries[name] = {"name": name, "samples": samples, "bytes": writer.commit(), record: fingerprint}
        save(complete=False)
    save(complete=True)
    return list(entries.values())


def _carried_fields(urls: Sequence[str], old: dict, record: str) -> dict:
    """The index fields an output folder carries over: those of the input folder's own index.json
    (what make-shards knew about the data) when the inputs share one folder, else of the output's."""
    src_dirs = {os.path.dirname(os.path.abspath(u)) for u in urls}
    src_index = read_index(next(iter(src_dirs))) if len(src_dirs) == 1 else None
    own = ("shards", "total", "complete", record, "skipped")
    return {k: v for k, v in (src_index or old).items() if k not in own}


def _add_members(writer: TarOut, url: str, add: Add, batch_size: int) -> None:
    """Copy the shard at `url` into `writer`, `add`'s members after each sample's own."""

    def flush(batch: Batch) -> None:
        for (key, members), new in zip(batch, add(batch, writer.path)):
            if key is None:
                for name, data in members:
                    writer.add_member(name, data)
                continue
            for name, data in members:
                if name not in new:
                    writer.add_member(name, data)
            for name, data in new.items():
                writer.add_member(name, data)
            writer.samples += 1

    batch: Batch = []
    for sample in read_tar_samples(url):
        batch.append(sample)
        if len(batch) == batch_size:
            flush(batch)
            batch = []
    if batch:
        flush(batch)
