"""Networks shipped with the package (modules/weights/<name>/): Denoiser directories whose
RECORD.json says how they were made (the exact commands, seed, budget, data, torch version,
machine) and holds the SHA-256 of every file, checked on every load.

The quickstart distils a shipped teacher, so its ten minutes go to what the suite is for (a
control branch on a frozen base, KD data, KD warmup, DMD2, inference, evaluation) instead of to
pretraining a base from scratch; `vidistill quickstart --from-scratch` reruns the recorded
commands instead.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

WEIGHTS = Path(__file__).resolve().parent / "weights"
RECORD = "RECORD.json"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def shipped(name: str) -> Path:
    """The directory of shipped network `name`, its files checked against RECORD.json."""
    path = WEIGHTS / name
    if not (path / RECORD).is_file():
        known = sorted(p.name for p in WEIGHTS.iterdir() if (p / RECORD).is_file()) if WEIGHTS.is_dir() else []
        raise FileNotFoundError(f"no shipped network {name!r} (shipped: {', '.join(known) or 'none'})")
    verify(path)
    return path


def verify(path: str | Path) -> dict:
    """Check every file RECORD.json lists against its SHA-256; returns the record."""
    path = Path(path)
    record = json.loads((path / RECORD).read_text())
    for file, expected in record["sha256"].items():
        if not (path / file).is_file():
            raise FileNotFoundError(f"{path / file} is missing (listed in {path / RECORD})")
        if sha256(path / file) != expected:
            raise ValueError(f"{path / file} does not match its recorded SHA-256 (damaged or replaced)")
    return record


def write_record(path: str | Path, **fields) -> dict:
    """Write RECORD.json in a network directory: `fields` (how it was made) and the SHA-256 of
    every other file there."""
    path = Path(path)
    files = sorted(p.name for p in path.iterdir() if p.is_file() and p.name != RECORD)
    record = {**fields, "sha256": {f: sha256(path / f) for f in files}}
    (path / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return record
