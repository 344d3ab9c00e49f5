"""Writing files so that none is ever half-written under its final name: everything goes to a
hidden sibling first and is renamed when complete (a rename within a directory is atomic), and a
write that fails removes what it had written. Shared by every writer (shards, videos, specs,
network directories), hence in the ground layer."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def partial(path: str | os.PathLike) -> Path:
    """The hidden sibling `path` is written to: `.NAME.partial.SUFFIX`, the suffix kept last
    because some writers (OpenCV's video writer) choose the format by it."""
    path = Path(path)
    return path.with_name(f".{path.stem}.partial{path.suffix}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def written(path: str | os.PathLike) -> Iterator[Path]:
    """Yield the temporary path to write `path` (a file or a directory) to; at the end of the
    block it replaces `path` (an existing directory is removed after the new one is in place),
    and if the block fails it is removed. An OSError naming no file or the temporary one names
    `path`, so that "No space left on device" says which file it was."""
    path = Path(path)
    tmp = partial(path)
    _remove(tmp)  # a leftover of a killed run
    try:
        yield tmp
        if path.is_dir() and tmp.is_dir():
            old = path.with_name(f".{path.name}.old")
            _remove(old)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except OSError as err:
        _remove(tmp)
        raise naming(err, path, tmp) from err
    except BaseException:
        _remove(tmp)
        raise


def naming(err: OSError, path: str | os.PathLike, tmp: str | os.PathLike | None = None) -> OSError:
    """`err`, naming `path` if it names no file (a full disk's error comes from a write to an open
    file, which names none), and the final name where it names the temporary `tmp` or a file in
    it: "No space left on device" says where, in the names the user knows."""
    name = None if err.filename is None else os.fspath(err.filename)
    if name is not None and tmp is not None and (name == os.fspath(tmp) or name.startswith(os.fspath(tmp) + os.sep)):
        name = os.fspath(path) + name[len(os.fspath(tmp)) :]
    elif name is not None:
        return err
    return type(err)(err.errno, err.strerror or str(err), name or os.fspath(path))


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with written(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    with written(path) as tmp:
        tmp.write_text(text)


def check_writable(folder: str | os.PathLike, what: str) -> None:
    """Write a file into `folder` (made for the test and removed again if missing), before any
    work whose output goes there; ValueError (one line, naming `what` and the folder) if that
    fails. A real write, not os.access: that says yes to root on a read-only mount and knows
    no full disk."""
    folder = Path(folder).absolute()
    made = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".writable-") as probe:
            probe.write(b"x")
            probe.flush()
        for p in made:  # deepest first: nothing is left before there is output
            p.rmdir()
    except OSError as err:
        reason = err.strerror or str(err)
        if err.errno == errno.ENOSPC:
            reason = "No space left on device"
        raise ValueError(f"{what} {folder} cannot be written: {reason}") from None
