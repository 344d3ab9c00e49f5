"""Named network sizes. `2b` is Cosmos-Transfer2.5-2B's shape; `14b` is Cosmos-Predict2.5-14B's
trunk with a control branch of the same kind; `tiny` is for CPU tests; `small` for the GPU quickstart."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .control_branch import ControlConfig
from .dit import DiTConfig


@dataclass
class NetConfig:
    """A base network plus one control branch per modality, all of one ControlConfig."""

    dit: DiTConfig = field(default_factory=DiTConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    modalities: list[str] = field(default_factory=lambda: ["edge"])
    """Control branches to build (edge, blur, depth, seg, keypoint); empty for a plain base."""
    cond_frame_t: float = 0.1
    """Time fed to the network for conditioning (clean) latent frames; diffusers' Transfer2.5 default."""
    use_text_mask: bool = True
    """Cross-attend only to real text tokens. Cosmos attends to all (zero- or pad-filled) positions,
    so imported Cosmos weights set this False."""
    prediction: str = "velocity"
    """What the DiT outputs: velocity (Cosmos; imported weights) or x0, the clean latent itself.
    x0 suits narrow networks on wide tokens (the CPU quickstart's pixel patches): a velocity
    output must reproduce the input noise through the whole trunk, an x0 output only the low-
    dimensional data (Li & He 2025, "Back to Basics: Let Denoising Generative Models Denoise").
    Losses and samplers are unchanged: they work in x0 / velocity space through `denoise`."""

    def __post_init__(self) -> None:
        if self.prediction not in ("velocity", "x0"):
            raise ValueError(f"prediction must be velocity or x0, got {self.prediction!r}")

    @classmethod
    def from_dict(cls, d: dict) -> NetConfig:
        """The config of a `to_dict` dict (a directory's config.json). Anything else (another
        model's config.json, a key this version does not know) raises ValueError naming it,
        rather than building the default network in its place."""
        _check_keys(d, cls, "")
        _check_keys(d["dit"], DiTConfig, "dit.")
        _check_keys(d.get("control", {}), ControlConfig, "control.")
        return cls(
            dit=DiTConfig(**d.get("dit", {})),
            control=ControlConfig(**d.get("control", {})),
            modalities=list(d.get("modalities", ["edge"])),
            cond_frame_t=d.get("cond_frame_t", 0.1),
            use_text_mask=d.get("use_text_mask", True),
            prediction=d.get("prediction", "velocity"),
        )

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if d["dit"]["sparse"] is None:  # dense: config.json as before the field existed
            del d["dit"]["sparse"]
        return d


def _check_keys(d: object, cls: type, where: str) -> None:
    """`d` is a dict of `cls`'s fields (a NetConfig's needs its `dit` part)."""
    known = [f.name for f in dataclasses.fields(cls)]
    if not isinstance(d, dict):
        what = where.rstrip(".") or "the config"
        raise ValueError(f"not a vidistill network config: {what} is a {type(d).__name__}, not an object")
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ValueError(
            f"not a vidistill network config: unknown key(s) {', '.join(where + k for k in unknown)} "
            f"(a {cls.__name__} has {', '.join(known)})"
        )
    if cls is NetConfig and "dit" not in d:
        raise ValueError(f"not a vidistill network config: no 'dit' section (a NetConfig has {', '.join(known)})")


PRESETS: dict[str, NetConfig] = {
    "tiny": NetConfig(
        DiTConfig(latent_channels=16, dim=64, depth=4, heads=4, text_dim=32, adaln_lora_dim=16),
        ControlConfig(blocks=2, every=2, channels=16),
    ),
    "small": NetConfig(
        DiTConfig(latent_channels=16, dim=768, depth=12, heads=12, text_dim=1024, adaln_lora_dim=128),
        ControlConfig(blocks=3, every=4, channels=16),
    ),
    "2b": NetConfig(
        DiTConfig(dim=2048, depth=28, heads=16, text_dim=1024, text_proj_in=100352),
        ControlConfig(blocks=4, every=7, channels=128),
    ),
    "14b": NetConfig(
        DiTConfig(dim=5120, depth=36, heads=40, text_dim=1024, text_proj_in=100352),
        ControlConfig(blocks=4, every=9, channels=128),
    ),
}


_NET_FIELDS = ("cond_frame_t", "use_text_mask", "prediction")


def preset(name: str, **overrides) -> NetConfig:
    """A copy of a preset with fields overridden: NetConfig's own scalars (cond_frame_t,
    use_text_mask, prediction) by name, everything else a DiTConfig field (e.g. latent_channels
    to fit a tokenizer)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    d = PRESETS[name].to_dict()
    d.update({k: overrides.pop(k) for k in _NET_FIELDS if k in overrides})
    cfg = NetConfig.from_dict(d)
    cfg.dit = dataclasses.replace(cfg.dit, **overrides)
    return cfg
