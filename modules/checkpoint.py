"""The project's checkpoints, never taken half-written: atomic saves through the Trainer, the
complete-marker of sharded (DCP) directories, and finding the latest complete checkpoint; and
the reading of a sharded checkpoint's networks back into Denoiser directories (consolidate).

Written once here for every writer (the checkpoint callback, pre-emption, a stage's non-finite
stop) and every reader (`--ckpt_path last`, consolidate).

A checkpoint directory written under ModelParallelStrategy holds `.metadata` (every tensor's global
shape, dtype and where its chunks lie), one `__<rank>_0.distcp` file per rank, and `meta.pt` (rank
0's non-tensor state: step, loops, hyperparameters). The stage's state dict is saved under
`state_dict.<attribute>.<parameter>`, optimizers under `optimizer_<i>.*`.

Networks are the stage's top-level attributes that hold a Denoiser (`model`, `student`, `teacher`,
`fake_score`, ...), recognised by their keys. Only the chosen networks' keys are read, straight
into full-size tensors (DCP copies chunk by chunk, casting on the way), so the optimizer state is
never touched and the peak memory is one exported network plus one chunk. EMA shadows (buffers of
`ema`, named like the parameters with "." -> "__") are exported as `ema`: the tracked network with
the EMA values in place of its trained parameters.

Each network's NetConfig is the one the stage saved in `meta.pt` under `net_configs` (see
Stage.on_save_checkpoint); for checkpoints without it, it is rebuilt from the hyperparameters as
Stage.net_config does, with the widths it takes from the tokenizer and text encoder read back from
the tensor shapes, and every shape is checked against the checkpoint.

Lightning is imported only by the functions that take a Trainer: reading a checkpoint must not
pay for it (seconds and hundreds of MB in a consolidate process).
"""

from __future__ import annotations

import errno
import gc
import json
import math
import os
import pickle
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from datamodules.files import naming

from .denoiser import Denoiser
from .nets import NetConfig, SparseAttention, preset

if TYPE_CHECKING:
    import lightning as L

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
    try:
        trainer.save_checkpoint(tmp, weights_only)  # ends with a barrier: every rank's shards are written
    except BaseException as err:  # DCP's CheckpointException is a BaseException
        full = disk_full(err, path.parent)
        if full is None:
            raise
        if trainer.is_global_zero:
            remove_checkpoint(tmp)  # give the disk back what the failed save took
        raise naming(full, path) from None
    if trainer.is_global_zero:
        _commit(tmp, path)
    trainer.strategy.barrier("save_atomic:commit")
    return path


def disk_full(err: BaseException, where: Path) -> OSError | None:
    """The full-disk (or quota) error behind a failed save, else None: raised as it is, wrapped in
    DCP's CheckpointException (one per failed rank), or torch.save's RuntimeError "file write
    failed" (which keeps no errno: then the disk under `where` is looked at)."""
    from torch.distributed.checkpoint.api import CheckpointException

    errors = [pair[0] for pair in err.failures.values()] if isinstance(err, CheckpointException) else [err]
    for e in errors:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return e
        if isinstance(e, RuntimeError) and "write failed" in str(e) and shutil.disk_usage(where).free < 2**20:
            return OSError(errno.ENOSPC, "No space left on device")
    return None


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
    from lightning.pytorch.callbacks import ModelCheckpoint

    dirs = [cb.dirpath for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.dirpath]
    return Path(dirs[0] if dirs else Path(trainer.default_root_dir) / "checkpoints") / f"{name}.ckpt"


# --- reading a sharded checkpoint's networks (consolidate) ------------------------------------------

PREFIX = "state_dict."
EMA = "ema"


class Saved:
    """Stands in for a class pickled in meta.pt (our config dataclasses, a callback's state), so
    reading the hyperparameters neither imports their modules (Lightning: seconds and hundreds of MB)
    nor runs any of their code: the object keeps its saved fields as attributes."""

    def __init__(self, *args, **kwargs):
        self.__dict__.update(kwargs, _args=args)

    def __setstate__(self, state) -> None:
        self.__dict__.update(state if isinstance(state, dict) else {"_state": state})

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


def read_meta(path: Path) -> dict:
    """meta.pt (rank 0's non-tensor state) with weights_only=True; its classes become `Saved`."""
    if not path.is_file():
        return {}
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        stand_ins = [(type(name.rpartition(".")[2], (Saved,), {}), name) for name in names]
        with torch.serialization.safe_globals(stand_ins):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise damaged(path, err) from None


def damaged(path: Path, err: Exception) -> ValueError:
    """The one-line error for a checkpoint file that does not read back (a copy or save that was
    cut short: truncated, the commonest way)."""
    why = str(err).split(".")[0] or type(err).__name__
    return ValueError(f"{path}: truncated or damaged checkpoint file ({why}); use an earlier checkpoint")


def read_metadata(path: Path):
    """DCP's `.metadata` of the checkpoint directory `path`, every shard file checked to be as
    long as the metadata says (a truncated `.distcp` is named, not found as an EOFError deep in
    the load)."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except (EOFError, pickle.UnpicklingError, AttributeError, ValueError) as err:
        raise damaged(path / ".metadata", err) from None
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = path / name
        if not file.is_file():
            raise FileNotFoundError(f"{file} is missing (the checkpoint's metadata lists it)")
        if file.stat().st_size < size:
            raise ValueError(
                f"{file}: truncated checkpoint file ({file.stat().st_size} bytes, its metadata needs {size}); "
                "use an earlier checkpoint"
            )
    return metadata


def check_checkpoint(path: str | Path) -> None:
    """A sharded checkpoint directory reads back whole (metadata, shard sizes, meta.pt): one line
    naming the file otherwise. Checkpoint files of other kinds are left to their loader."""
    path = Path(path)
    if path.is_dir() and (path / ".metadata").exists():
        read_metadata(path)
        read_meta(path / "meta.pt")


class Checkpoint:
    """What a sharded checkpoint directory holds, read from its metadata only (no tensor data)."""

    def __init__(self, path: str | Path):
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.path = Path(path)
        if not (self.path / ".metadata").is_file():
            inside = sorted(p.parent.name for p in self.path.glob("*/.metadata")) if self.path.is_dir() else []
            if inside:
                what = "a directory of checkpoints: pick one of " + ", ".join(inside)
            elif self.path.exists():
                what = "a file" if self.path.is_file() else "not a sharded checkpoint (no .metadata)"
            else:
                what = "not found"
            raise FileNotFoundError(
                f"{self.path} is {what}; consolidate reads the checkpoint directories of "
                "sharded (FSDP2/DCP) runs, holding .metadata and __<rank>_0.distcp files"
            )
        self.metadata = read_metadata(self.path)
        self.tensors = {
            k[len(PREFIX) :]: md
            for k, md in self.metadata.state_dict_metadata.items()
            if k.startswith(PREFIX) and isinstance(md, TensorStorageMetadata)
        }
        self.meta = read_meta(self.path / "meta.pt")
        self.hparams = self.meta.get("hyper_parameters") or {}
        # whatever a stage calls its networks, a Denoiser shows by its DiT's input embedding
        self.networks = [k.split(".")[0] for k in self.tensors if k.split(".", 1)[1:] == ["net.x_embed.weight"]]
        self.ema = {k[len(EMA) + 1 :].replace("__", "."): k for k in self.tensors if k.startswith(EMA + ".")}
        # DMD2's discriminator head (modules/nets/gan.py), recognised by its first tap
        self.heads = [k.split(".")[0] for k in self.tensors if k.split(".", 1)[1:] == ["taps.0.fc1.weight"]]

    def exportable(self) -> list[str]:
        """What `export` can write: the Denoisers, the GAN heads, and `ema` when there is one."""
        return self.networks + self.heads + ([EMA] if self.ema else [])

    def choose(self, networks: list[str] | None = None) -> list[str]:
        """`networks` (default: every exportable one), refused when it names something else."""
        available = self.exportable()
        if not self.networks:
            raise ValueError(
                f"{self.path} holds no Denoiser network (top-level attributes: "
                f"{sorted({k.split('.')[0] for k in self.tensors})})"
            )
        chosen = available if not networks else list(networks)
        unknown = [n for n in chosen if n not in available]
        if unknown:
            others = sorted({k.split(".")[0] for k in self.tensors} - set(available) - {EMA})
            raise ValueError(
                f"unknown network(s) {unknown}; this checkpoint has {available}"
                + (f" (other modules, not Denoisers: {others})" if others else "")
            )
        return chosen

    def keys(self, network: str) -> list[str]:
        """A network's parameter names (without the attribute prefix), in state-dict order."""
        head = network + "."
        return [k[len(head) :] for k in self.tensors if k.startswith(head)]

    def shape(self, key: str) -> tuple[int, ...] | None:
        md = self.tensors.get(key)
        return None if md is None else tuple(md.size)

    def ema_target(self) -> str | None:
        """The network the EMA shadows: the one the stage named, else the only network holding every
        EMA name (student before model where several do, e.g. a student and its same-shaped teacher)."""
        if not self.ema:
            return None
        if self.meta.get("ema_of"):
            return self.meta["ema_of"]
        fits = [
            n for n in self.networks if all(self.shape(f"{n}.{k}") == self.shape(key) for k, key in self.ema.items())
        ]
        for name in ("student", "model"):
            if name in fits:
                return name
        if len(fits) == 1:
            return fits[0]
        raise ValueError(f"{self.path}: cannot tell which network the EMA shadows (fits: {fits or 'none'})")

    def files(self, fqns: list[str]) -> set[str]:
        """The .distcp files holding chunks of these checkpoint keys."""
        wanted = set(fqns)
        return {info.relative_path for index, info in self.metadata.storage_data.items() if index.fqn in wanted}

    def load(self, sources: dict[str, str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Full tensors for {output name: key under state_dict.}, read chunk by chunk from the shards."""
        import torch.distributed.checkpoint as dcp

        fqns = [PREFIX + key for key in sources.values()]
        missing = sorted(f for f in self.files(fqns) if not (self.path / f).is_file())
        if missing:
            raise FileNotFoundError(
                f"{self.path}: shard file(s) {', '.join(missing)} missing (the checkpoint "
                "was copied or written incompletely)"
            )
        state = {}
        for fqn in fqns:
            md = self.metadata.state_dict_metadata[fqn]
            target = md.properties.dtype if dtype is None or not md.properties.dtype.is_floating_point else dtype
            state[fqn] = torch.empty(tuple(md.size), dtype=target)
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
            dcp.load(state, checkpoint_id=str(self.path), no_dist=True)
        return {out: state[PREFIX + key] for out, key in sources.items()}


def spec_candidates(hparams: dict, network: str) -> list:
    """NetSpec-like hyperparameters (preset / init_from / overrides), the likeliest for `network` first."""

    def is_spec(v):
        return all(hasattr(v, a) for a in ("preset", "init_from", "overrides"))

    order = [network, f"{network}_net", f"net_{network}"] + (["net"] if network == "model" else [])
    named = [hparams[k] for k in order if is_spec(hparams.get(k))]
    return named + [v for k, v in hparams.items() if k not in order and is_spec(v)]


def config_from_spec(ckpt: Checkpoint, network: str, spec) -> NetConfig:
    """Stage.net_config for `spec`, with the tokenizer / text-encoder widths read from the shapes."""
    head = network + ".net."
    if spec.init_from:
        if not (Path(spec.init_from) / "config.json").is_file():
            raise FileNotFoundError(f"{network} started from {spec.init_from}, whose config.json is gone")
        cfg = Denoiser.config_from(spec.init_from)
    else:
        cfg = preset(spec.preset, **(spec.overrides or {}))
        patch = math.prod(cfg.dit.patch)
        cfg.dit.latent_channels = ckpt.shape(head + "final.weight")[0] // patch
        tokenizer = ckpt.hparams.get("tokenizer")
        if getattr(tokenizer, "kind", "pixel") != "none":
            cfg.control.channels = max(cfg.control.channels, cfg.dit.latent_channels)
        if cfg.dit.text_proj_in and ckpt.shape(head + "text_proj.weight"):
            cfg.dit.text_proj_in = ckpt.shape(head + "text_proj.weight")[1]
        elif ckpt.shape(head + "blocks.0.ca.kv.weight"):
            cfg.dit.text_dim = ckpt.shape(head + "blocks.0.ca.kv.weight")[1]
    if getattr(spec, "sparse", None):
        cfg.dit.sparse = SparseAttention.from_dict(spec.sparse)
    cfg.modalities = list(dict.fromkeys(k.split(".")[1] for k in ckpt.keys(network) if k.startswith("controls.")))
    return cfg


def shape_errors(cfg: NetConfig, ckpt: Checkpoint, network: str) -> list[str]:
    """Where a Denoiser built from `cfg` and the checkpoint's tensors of `network` differ."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Denoiser(cfg).state_dict().items()}
    found = {k: ckpt.shape(f"{network}.{k}") for k in ckpt.keys(network)}
    errors = [f"missing {k}" for k in expected if k not in found]
    errors += [f"unexpected {k}" for k in found if k not in expected]
    errors += [
        f"{k}: config {expected[k]} vs checkpoint {found[k]}"
        for k in expected
        if k in found and expected[k] != found[k]
    ]
    return errors


def network_config(ckpt: Checkpoint, network: str) -> NetConfig:
    """The NetConfig of `network`: saved in the checkpoint, else rebuilt from the hyperparameters."""
    stored = (ckpt.meta.get("net_configs") or {}).get(network)
    tried = []
    if stored is not None:
        candidates = [("the config saved in meta.pt", NetConfig.from_dict(stored))]
    else:
        candidates = []
        for spec in spec_candidates(ckpt.hparams, network):
            try:
                candidates.append((f"hyperparameter {spec}", config_from_spec(ckpt, network, spec)))
            except FileNotFoundError as err:
                tried.append(str(err))
    for source, cfg in candidates:
        errors = shape_errors(cfg, ckpt, network)
        if not errors:
            return cfg
        tried.append(f"{source} does not fit: " + "; ".join(errors[:5]) + (" ..." if len(errors) > 5 else ""))
    raise ValueError(
        f"{ckpt.path}: no network config for {network!r} fits its tensors"
        + (": " + " | ".join(tried) if tried else " (meta.pt holds neither net_configs nor a NetSpec)")
    )


@dataclass
class Exported:
    """What `export` wrote: a network directory of `tensors` tensors in `nbytes` bytes."""

    path: Path
    tensors: int
    nbytes: int
    ema_of: str | None = None
    """The network whose EMA weights these are (the `ema` export)."""


def export(ckpt: Checkpoint, name: str, out: Path, dtype: torch.dtype | None = None) -> Exported:
    """Write network `name` of the checkpoint (a Denoiser, `ema` or a GAN head) to `out`, its
    floating tensors cast to `dtype` (None: as stored). Only its tensors are read, and they are
    freed before returning, so exporting one network after another holds one at a time."""
    if name in ckpt.heads:
        return export_head(ckpt, name, out, dtype)
    net = ckpt.ema_target() if name == EMA else name
    cfg = network_config(ckpt, net)
    keys = ckpt.keys(net)
    if name == EMA and set(ckpt.ema) - set(keys):
        raise ValueError(
            f"{ckpt.path}: EMA entries {sorted(set(ckpt.ema) - set(keys))[:5]} are not parameters of {net}"
        )
    sources = {k: (ckpt.ema[k] if name == EMA and k in ckpt.ema else f"{net}.{k}") for k in keys}
    state = ckpt.load(sources, dtype)
    with torch.device("meta"):
        shell = Denoiser(cfg)
    shell.save_pretrained(out, state)
    write_settings(ckpt.meta, net, out)
    done = Exported(
        out, len(state), sum(t.numel() * t.element_size() for t in state.values()), net if name == EMA else None
    )
    del state, shell
    gc.collect()
    return done


def write_settings(meta: dict, network: str, out: Path) -> None:
    """generation.json of an exported network: the stage's, whose sampler belongs to the trained
    network (a student's t-list); frozen networks (teacher, fake score) sample as teachers."""
    from dataclasses import asdict

    from modules.sampling import GenerationSettings, SamplerConfig

    gen = meta.get("generation")
    if not gen:
        return  # checkpoints from before generation.json: infer then needs --tokenizer / --text_encoder
    settings = GenerationSettings(**gen)
    if network != meta.get("trained"):
        settings.sampler = asdict(SamplerConfig(shift=settings.sampler.get("shift", SamplerConfig.shift)))
    settings.save(out)


def export_head(ckpt: Checkpoint, name: str, out: Path, dtype: torch.dtype | None) -> Exported:
    """A GAN head as config.json (GANHeadConfig, `"kind": "gan_head"`) + model.safetensors."""
    import json

    from safetensors.torch import save_file

    cfg = (ckpt.meta.get("head_configs") or {}).get(name)
    if cfg is None:  # older checkpoints: width from the tensors, taps from the stage's gan spec
        fc1 = ckpt.shape(f"{name}.taps.0.fc1.weight")
        gan = ckpt.hparams.get("gan")
        taps = sorted(set(getattr(gan, "taps", ()) or ()))
        if len(taps) != len([k for k in ckpt.keys(name) if k.endswith(".fc1.weight")]):
            raise ValueError(f"{ckpt.path}: cannot tell which blocks {name} reads (no head_configs in meta.pt)")
        cfg = {"dim": fc1[1], "taps": taps, "hidden": fc1[0]}
    state = ckpt.load({k: f"{name}.{k}" for k in ckpt.keys(name)}, dtype)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(dict(cfg, kind="gan_head"), indent=2))
    save_file({k: v.contiguous() for k, v in state.items()}, out / "model.safetensors")
    return Exported(out, len(state), sum(t.numel() * t.element_size() for t in state.values()))
