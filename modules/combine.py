"""A base network and its control branches -> one teacher Denoiser directory, and back
(`vidistill combine`).

Control training writes (export / consolidate) a Denoiser directory holding its frozen base and the
trained branch; bases and branches are trained, versioned and shipped separately, so a teacher is
put together from a base plus one or more branches (`join`), and split into them again (`split`).

A split's `base` is a plain Denoiser directory (no control branch). Its `control_<m>` holds only the
tensors `controls.<m>.*` with the full config.json (modalities: [<m>]), so it can be checked against
a base; it is not loadable on its own. Joining the parts (in the split's order) gives the teacher
back bit for bit.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import torch

from .denoiser import Denoiser
from .nets import NetConfig

# DiT fields that change tensor shapes: a branch built for other values cannot run on the base
SHAPE_FIELDS = (
    "latent_channels",
    "dim",
    "depth",
    "heads",
    "mlp_ratio",
    "text_dim",
    "text_proj_in",
    "adaln_lora_dim",
    "patch",
)


def weights_file(path: str | Path) -> Path:
    """A network directory's model.safetensors, which must be there."""
    file = Path(path) / "model.safetensors"
    if not file.is_file():
        raise FileNotFoundError(
            f"{file} not found (expected a directory written by export, consolidate, import-weights or combine)"
        )
    return file


def check_base(base: NetConfig, branch: NetConfig, source: str) -> None:
    """Error where the branch's base has other shapes; warn where it ran with other settings."""
    shape = [
        f"{f} {getattr(branch.dit, f)} vs {getattr(base.dit, f)}"
        for f in SHAPE_FIELDS
        if getattr(branch.dit, f) != getattr(base.dit, f)
    ]
    if shape:
        raise ValueError(f"{source} was trained on another base (its base vs this one: {', '.join(shape)})")
    other = [
        f"dit.{f.name}"
        for f in dataclasses.fields(base.dit)
        if f.name not in SHAPE_FIELDS and getattr(branch.dit, f.name) != getattr(base.dit, f.name)
    ]
    other += [f for f in ("cond_frame_t", "use_text_mask", "prediction") if getattr(branch, f) != getattr(base, f)]
    if other:
        warnings.warn(
            f"{source} was trained with other {', '.join(other)} than the base has; "
            "the combined network keeps the base's",
            stacklevel=3,
        )


def compare_base(state: dict[str, torch.Tensor], handle, source: str) -> None:
    """A full network directory given as a control carries the base it was trained on: say if it is
    not this one (frozen during control training, it should be equal bit for bit)."""
    keys = [k for k in handle.keys() if k.startswith("net.")]
    differ = [k for k in keys if k not in state or not torch.equal(handle.get_tensor(k).to(state[k].dtype), state[k])]
    if differ:
        warnings.warn(
            f"{source} carries a different base ({len(differ)} of {len(keys)} base tensors differ, "
            f"e.g. {differ[0]}): its control branch was trained on another base",
            stacklevel=3,
        )


def join(base: str, controls: list[str], out: str | Path, dtype: torch.dtype | None = None) -> NetConfig:
    """Write the base with the control branches of `controls` added, in that order, to `out`;
    `dtype` casts the floating tensors (without it the parts must agree). Returns its config."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    cfg = Denoiser.config_from(base)
    state = load_file(weights_file(base))
    for source in controls:
        branch_cfg = Denoiser.config_from(source)
        check_base(cfg, branch_cfg, source)
        if cfg.modalities and branch_cfg.control != cfg.control:
            raise ValueError(
                f"{source}'s control branch is shaped {branch_cfg.control}, the branches already "
                f"in the network {cfg.control} (one ControlConfig for all)"
            )
        with safe_open(weights_file(source), "pt") as handle:
            present = {k.split(".")[1] for k in handle.keys() if k.startswith("controls.")}
            modalities = [m for m in branch_cfg.modalities if m in present]
            if not modalities:
                raise ValueError(f"{source} holds no control branch (no controls.* tensors)")
            clash = [m for m in modalities if m in cfg.modalities]
            if clash:
                raise ValueError(f"{source} brings control branch(es) {clash} the network already has")
            compare_base(state, handle, source)
            for k in handle.keys():
                if k.startswith("controls.") and k.split(".")[1] in modalities:
                    state[k] = handle.get_tensor(k)
        cfg = dataclasses.replace(cfg, control=branch_cfg.control, modalities=cfg.modalities + modalities)
    state = with_dtype(state, dtype)
    write(cfg, state, Path(out))
    copy_settings([base] + controls, Path(out))
    return cfg


def split(teacher: str, out: str | Path, dtype: torch.dtype | None = None) -> list[Path]:
    """Write the teacher's base to out/base and each control branch to out/control_<modality>;
    returns their directories. Without `dtype` the tensors stay as stored, so joining the parts
    gives the teacher back bit for bit."""
    from safetensors.torch import load_file

    cfg = Denoiser.config_from(teacher)
    if not cfg.modalities:
        raise ValueError(f"{teacher} has no control branch to split off")
    state = load_file(weights_file(teacher))
    state = with_dtype(state, dtype) if dtype else state  # as stored: the parts combine back bit for bit
    parts = {"base": (dataclasses.replace(cfg, modalities=[]), "net.")}
    parts.update({f"control_{m}": (dataclasses.replace(cfg, modalities=[m]), f"controls.{m}.") for m in cfg.modalities})
    for name, (part_cfg, prefix) in parts.items():
        with torch.device("meta"):
            shell = Denoiser(part_cfg)
        shell.save_pretrained(Path(out) / name, {k: v for k, v in state.items() if k.startswith(prefix)})
        copy_settings([teacher], Path(out) / name)
    return [Path(out) / n for n in parts]


def copy_settings(sources: list[str], out: Path) -> None:
    """Carry generation.json (tokenizer, text encoder, sampler) over from the first source that has one."""
    from modules.sampling import GENERATION_FILE

    for source in sources:
        file = Path(source) / GENERATION_FILE
        if file.is_file():
            (out / GENERATION_FILE).write_text(file.read_text())
            return


def with_dtype(state: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Cast floating tensors to `dtype`; without one, mixed precisions are an error (a network whose
    branch and base differ in dtype fails in its first matmul)."""
    if dtype is not None:
        return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    kinds = {v.dtype for v in state.values() if v.is_floating_point()}
    if len(kinds) > 1:
        raise ValueError(f"the parts hold tensors of {sorted(map(str, kinds))}: choose one with --dtype")
    return state


def write(cfg: NetConfig, state: dict[str, torch.Tensor], out: Path) -> None:
    """Save through Denoiser.save_pretrained after checking the tensors build exactly this network."""
    with torch.device("meta"):
        shell = Denoiser(cfg)
    expected = {k: tuple(v.shape) for k, v in shell.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if expected != found:
        bad = sorted(set(expected) ^ set(found)) + [k for k in expected if k in found and expected[k] != found[k]]
        raise ValueError(f"the combined tensors do not fit the combined config: {bad[:8]}")
    shell.save_pretrained(out, state)
