"""The project's checkpoints, never taken half-written: atomic saves through the Trainer, the
complete-marker of sharded (DCP) directories, and finding the latest complete checkpoint.

Written once here for every writer (the checkpoint callback, pre-emption, a stage's non-finite
stop) and every reader (`--ckpt_path last`, consolidate).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

COMPLETE = "complete.json"
"""Marker a sharded (DCP) checkpoint directory gets once every rank's files are written."""
PARTIAL, STALE = ".partial", ".stale"


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint (file, link or directory); a directory loses its marker first, so a
    deletion cut short never leaves something that reads as complete."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        (path / COMPLETE).unlink(missing_ok=True)
        shutil.rmtree(path)


def _fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (a crash of the node after it must not undo it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(tmp: Path, path: Path) -> None:
    """Put the finished checkpoint `tmp` at `path`. A file is replaced atomically; a directory
    cannot replace a non-empty one, so the old one moves aside to `<path>.stale` first (it stays
    a complete candidate for "last" until the new one is in place)."""
    if tmp.is_dir():
        marker = tmp / COMPLETE
        marker.with_suffix(".tmp").write_text(json.dumps({"path": path.name}))
        os.replace(marker.with_suffix(".tmp"), marker)
    if tmp.is_dir() and (path.exists() or path.is_symlink()):
        stale = path.with_name(path.name + STALE)
        remove_checkpoint(stale)
        os.replace(path, stale)
        os.replace(tmp, path)
        remove_checkpoint(stale)
    else:
        os.replace(tmp, path)
    _fsync_dir(path.parent)


def save_atomic(trainer: L.Trainer, path: str | Path, weights_only: bool = False) -> Path:
    """Save a checkpoint (every rank calls this) so that `path` only ever holds a complete one:
    written under `<path>.partial`, marked complete by rank 0 after every rank has written its
    shards, then renamed. A kill at any point leaves the previous checkpoints as they were."""
    path = Path(path)
    tmp = path.with_name(path.name + PARTIAL)
    if trainer.is_global_zero:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_checkpoint(tmp)  # a leftover of a save that was killed
    trainer.strategy.barrier("save_atomic:clean")
    trainer.save_checkpoint(tmp, weights_only)  # ends with a barrier: every rank's shards are written
    if trainer.is_global_zero:
        _commit(tmp, path)
    trainer.strategy.barrier("save_atomic:commit")
    return path


def checkpoint_step(path: Path) -> int | None:
    """Global step of the complete checkpoint at `path`; None when it is not complete."""
    try:
        if path.is_dir():
            if not (path / COMPLETE).is_file():
                return None
            meta = torch.load(path / "meta.pt", map_location="cpu", weights_only=False)
        else:
            meta = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        return int(meta["global_step"])
    except Exception:  # noqa: BLE001 - any unreadable checkpoint is not a candidate
        return None


def latest_checkpoint(dirpath: str | Path) -> Path | None:
    """The complete checkpoint with the highest global step in `dirpath` (`*.ckpt` files and
    marked directories, and a `.stale` one left by a kill between the two renames of `_commit`).
    Half-written (`.partial`) and unmarked directories are never candidates."""
    dirpath = Path(dirpath)
    if not dirpath.is_dir():
        return None
    found = []
    for p in dirpath.iterdir():
        if not (p.name.endswith(".ckpt") or p.name.endswith(".ckpt" + STALE)):
            continue
        step = checkpoint_step(p)
        if step is not None:
            found.append((step, not p.name.endswith(STALE), p.stat().st_mtime_ns, p))
    return max(found)[3] if found else None


def checkpoint_path(trainer: L.Trainer, name: str) -> Path:
    """`<checkpoint dir>/<name>.ckpt`: the first ModelCheckpoint's directory (where "last" looks),
    else `<default_root_dir>/checkpoints`."""
    dirs = [cb.dirpath for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.dirpath]
    return Path(dirs[0] if dirs else Path(trainer.default_root_dir) / "checkpoints") / f"{name}.ckpt"
