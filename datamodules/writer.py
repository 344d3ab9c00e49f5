"""Writing webdataset shards resumably and crash-safely (used by make-shards, encode-text and the
synthetic datasets).

Shard ``i`` always holds the same planned samples (``samples_per_shard`` consecutive ones of the
sorted list); each shard is written to ``name.tar.tmp`` and renamed when complete, so a file under
a final name is always whole; ``index.json`` is rewritten after every finished shard. A rerun
keeps every shard that index.json records with the same planned keys and options (or, with no
index.json at all, every shard whose keys are the planned ones) and writes the rest.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

__all__ = [
    "INDEX",
    "SkipSample",
    "TarOut",
    "config_digest",
    "read_index",
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
# Tar and index primitives (shared with tools/encode_text.py)
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
        """Finish the tar and move it under its final name; returns its size in bytes."""
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp, self.path)
        return os.path.getsize(self.path)

    def abort(self) -> None:
        self._tar.close()
        self._file.close()
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
    path = Path(out) / INDEX
    tmp = path.with_name(INDEX + ".tmp")
    tmp.write_text(json.dumps(index, indent=1) + "\n")
    os.replace(tmp, path)


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
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if not keys:
        raise ValueError("no samples to write")
    if len(set(keys)) != len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})[:5]
        raise ValueError(f"sample keys are not unique: {dup}")
    if not prefix or "/" in prefix or "." in prefix:
        raise ValueError(f"prefix must be a plain name without '/' or '.', got {prefix!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    old = read_index(out)
    if old is not None:
        others = sorted({e["name"] for e in old["shards"] if not str(e.get("name", "")).startswith(prefix + "-")})
        if others:
            raise ValueError(
                f"{out} already holds shards of another prefix ({others[0]}, ...); write each split to its own folder"
            )
    old_entries = {e["name"]: e for e in (old or {}).get("shards", [])}
    n_shards = -(-len(keys) // samples_per_shard)
    plans = [list(keys[i * samples_per_shard : (i + 1) * samples_per_shard]) for i in range(n_shards)]
    names = [shard_name(prefix, i) for i in range(n_shards)]
    plan_ids = [config_digest(config, plan) for plan in plans]

    entries: dict[str, dict] = {}
    if resume:
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
    # shards of an earlier, longer run of this prefix and leftovers of a crash
    for name in old_entries:
        if name not in names and (out / name).is_file():
            print(f"removing {out / name}: not part of this dataset any more")
            (out / name).unlink()
    for tmp in out.glob(f"{prefix}-*.tar.tmp"):
        tmp.unlink()

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
            writer = TarOut(out / name)
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
            except BaseException:
                writer.abort()
                raise
            if writer.samples == 0:
                writer.abort()
                for reason, n in shard_skips.items():
                    before[reason] = before.get(reason, 0) + n
                if (out / name).is_file():  # an older shard of that name is not this one
                    (out / name).unlink()
                warnings.warn(f"shard {name}: every sample was skipped; no file written", stacklevel=2)
                continue
            size = writer.commit()
            entries[name] = {"name": name, "samples": writer.samples, "bytes": size, "plan": plan_id}
            if shard_skips:
                entries[name]["skipped"] = shard_skips
            save(complete=False)
    finally:
        bar.close()
    save(complete=True)
    return [str(out / n) for n in names if n in entries]
