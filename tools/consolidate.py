"""`vidistill consolidate`: a sharded (DCP) training checkpoint -> one Denoiser directory per network.

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
"""

from __future__ import annotations

import gc
import math
import warnings
from pathlib import Path

import torch

from modules.denoiser import Denoiser
from modules.nets import NetConfig, preset

PREFIX = "state_dict."
EMA = "ema"
DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}


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
    names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    stand_ins = [(type(name.rpartition(".")[2], (Saved,), {}), name) for name in names]
    with torch.serialization.safe_globals(stand_ins):
        return torch.load(path, map_location="cpu", weights_only=True)


class Checkpoint:
    """What a sharded checkpoint directory holds, read from its metadata only (no tensor data)."""

    def __init__(self, path: str | Path):
        from torch.distributed.checkpoint import FileSystemReader
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
        self.metadata = FileSystemReader(str(self.path)).read_metadata()
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


def consolidate(ckpt: str, *, out: str, networks: list[str] | None = None, dtype: str | None = None) -> None:
    """Export the networks of a sharded training checkpoint as Denoiser directories.

    Writes OUT/<network>/ (config.json + model.safetensors, loadable with Denoiser.from_pretrained)
    for each chosen network (model, student, teacher, fake_score, ...) and OUT/ema/ (the trained
    network with its EMA weights) when the checkpoint keeps an EMA. Runs on CPU without a process
    group; reads only the chosen networks' tensors (never the optimizer state), one network at a time.

    Args:
        ckpt: checkpoint directory of a sharded run (holding .metadata and __<rank>_0.distcp files).
        out: output directory; one sub-directory per network.
        networks: networks to export (default: all, plus ema when present).
        dtype: cast floating tensors to bf16, fp16 or fp32 (default: as stored).
    """
    from tqdm import tqdm

    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    cast = DTYPES[dtype] if dtype else None
    source = Checkpoint(ckpt)
    available = source.networks + source.heads + ([EMA] if source.ema else [])
    if not source.networks:
        raise ValueError(
            f"{ckpt} holds no Denoiser network (top-level attributes: "
            f"{sorted({k.split('.')[0] for k in source.tensors})})"
        )
    chosen = available if not networks else list(networks)
    unknown = [n for n in chosen if n not in available]
    if unknown:
        others = sorted({k.split(".")[0] for k in source.tensors} - set(available) - {EMA})
        raise ValueError(
            f"unknown network(s) {unknown}; this checkpoint has {available}"
            + (f" (other modules, not Denoisers: {others})" if others else "")
        )
    step = source.meta.get("global_step")
    bar = tqdm(chosen, desc="consolidate", unit="network", disable=len(chosen) < 2 or None)
    for name in bar:
        bar.set_postfix_str(name)
        if name in source.heads:
            export_head(source, name, Path(out) / name, cast)
            continue
        net = source.ema_target() if name == EMA else name
        cfg = network_config(source, net)
        keys = source.keys(net)
        if name == EMA and set(source.ema) - set(keys):
            raise ValueError(
                f"{ckpt}: EMA entries {sorted(set(source.ema) - set(keys))[:5]} are not parameters of {net}"
            )
        sources = {k: (source.ema[k] if name == EMA and k in source.ema else f"{net}.{k}") for k in keys}
        state = source.load(sources, cast)
        with torch.device("meta"):
            shell = Denoiser(cfg)
        shell.save_pretrained(Path(out) / name, state)
        write_settings(source.meta, net, Path(out) / name)
        size = sum(t.numel() * t.element_size() for t in state.values())
        tqdm.write(
            f"{Path(out) / name}: {len(state)} tensors, {size / 2**20:.1f} MiB"
            + (f" (EMA of {net})" if name == EMA else "")
            + (f", step {step}" if step is not None else "")
        )
        # one network in memory at a time
        del state, shell
        gc.collect()


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


def export_head(ckpt: Checkpoint, name: str, out: Path, dtype: torch.dtype | None) -> None:
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
