"""`vidistill import-weights`: Cosmos-Transfer2.5 / Predict2.5 checkpoints in diffusers layout ->
our Denoiser (config.json + model.safetensors).

diffusers keeps q/k/v as separate matrices and gives the ControlNet its own copies of the base's
input embedding, timestep embedding and text projection. We fuse q/k/v (one matmul) and let
control branches reuse the base's embeddings, so those copies must equal the base's tensors:
the import checks that instead of silently dropping weights that differ.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from modules.denoiser import Denoiser
from modules.nets import ControlConfig, DiTConfig, NetConfig

# diffusers block sub-key -> (our sub-key, slot in a fused tensor or None)
_BLOCK = {
    "norm1.linear_1.weight": ("mod_sa.down.weight", None),
    "norm1.linear_2.weight": ("mod_sa.up.weight", None),
    "norm2.linear_1.weight": ("mod_ca.down.weight", None),
    "norm2.linear_2.weight": ("mod_ca.up.weight", None),
    "norm3.linear_1.weight": ("mod_mlp.down.weight", None),
    "norm3.linear_2.weight": ("mod_mlp.up.weight", None),
    "attn1.to_q.weight": ("sa.qkv.weight", 0),
    "attn1.to_k.weight": ("sa.qkv.weight", 1),
    "attn1.to_v.weight": ("sa.qkv.weight", 2),
    "attn1.norm_q.weight": ("sa.q_norm.weight", None),
    "attn1.norm_k.weight": ("sa.k_norm.weight", None),
    "attn1.to_out.0.weight": ("sa.out.weight", None),
    "attn2.to_q.weight": ("ca.q.weight", None),
    "attn2.to_k.weight": ("ca.kv.weight", 0),
    "attn2.to_v.weight": ("ca.kv.weight", 1),
    "attn2.norm_q.weight": ("ca.q_norm.weight", None),
    "attn2.norm_k.weight": ("ca.k_norm.weight", None),
    "attn2.to_out.0.weight": ("ca.out.weight", None),
    "ff.net.0.proj.weight": ("mlp.fc1.weight", None),
    "ff.net.2.weight": ("mlp.fc2.weight", None),
}
_TRANSFORMER_TOP = {
    "patch_embed.proj.weight": "x_embed.weight",
    "time_embed.t_embedder.linear_1.weight": "t_fc1.weight",
    "time_embed.t_embedder.linear_2.weight": "t_fc2.weight",
    "time_embed.norm.weight": "t_norm.weight",
    "crossattn_proj.0.weight": "text_proj.weight",
    "crossattn_proj.0.bias": "text_proj.bias",
    "norm_out.linear_1.weight": "final_mod.down.weight",
    "norm_out.linear_2.weight": "final_mod.up.weight",
    "proj_out.weight": "final.weight",
}
# ControlNet copies of base tensors: controlnet key -> transformer key
_CONTROL_SHARED = {
    "patch_embed_base.proj.weight": "patch_embed.proj.weight",
    "time_embed.t_embedder.linear_1.weight": "time_embed.t_embedder.linear_1.weight",
    "time_embed.t_embedder.linear_2.weight": "time_embed.t_embedder.linear_2.weight",
    "time_embed.norm.weight": "time_embed.norm.weight",
    "crossattn_proj.0.weight": "crossattn_proj.0.weight",
    "crossattn_proj.0.bias": "crossattn_proj.0.bias",
}


class CheckpointMismatch(ValueError):
    """A checkpoint that does not fit: the message lists every offending key."""


def net_config(transformer: dict, controlnet: dict | None, modalities: list[str]) -> NetConfig:
    """Our NetConfig from diffusers' config.json dicts; unsupported features fail loudly."""
    t = transformer
    unsupported = []
    if t.get("extra_pos_embed_type"):
        unsupported.append(f"extra_pos_embed_type={t['extra_pos_embed_type']!r} (Cosmos 2.5 uses None)")
    if t.get("img_context_dim_in"):
        unsupported.append("img_context_dim_in (image context)")
    if not t.get("concat_padding_mask", True):
        unsupported.append("concat_padding_mask=False")
    if t["out_channels"] != t["in_channels"] - 1:
        unsupported.append(
            f"in_channels={t['in_channels']} with out_channels={t['out_channels']} "
            "(expected latents + one condition-mask channel)"
        )
    if (
        t.get("use_crossattn_projection")
        and t.get("encoder_hidden_states_channels", t["text_embed_dim"]) != t["text_embed_dim"]
    ):
        unsupported.append("encoder_hidden_states_channels != text_embed_dim")
    if unsupported:
        raise CheckpointMismatch("unsupported transformer config: " + "; ".join(unsupported))
    dit = DiTConfig(
        latent_channels=t["in_channels"] - 1,
        dim=t["num_attention_heads"] * t["attention_head_dim"],
        depth=t["num_layers"],
        heads=t["num_attention_heads"],
        mlp_ratio=t.get("mlp_ratio", 4.0),
        text_dim=t["text_embed_dim"],
        text_proj_in=t["crossattn_proj_in_channels"] if t.get("use_crossattn_projection") else None,
        adaln_lora_dim=t.get("adaln_lora_dim", 256),
        patch=tuple(t.get("patch_size", (1, 2, 2))),
        rope_scale=tuple(t.get("rope_scale", (2.0, 1.0, 1.0))),
    )
    control = ControlConfig()
    if controlnet is not None:
        c = controlnet
        if c["model_channels"] != dit.dim or c["num_attention_heads"] != dit.heads:
            raise CheckpointMismatch("controlnet width/heads differ from the transformer's")
        if not t.get("controlnet_block_every_n"):
            raise CheckpointMismatch("transformer config has no controlnet_block_every_n")
        control = ControlConfig(
            blocks=c["n_controlnet_blocks"], every=t["controlnet_block_every_n"], channels=c["in_channels"] - 2
        )
    # Cosmos attends to every (padded) text position
    return NetConfig(
        dit=dit, control=control, modalities=modalities if controlnet is not None else [], use_text_mask=False
    )


def read_folder(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """config.json and the union of every *.safetensors shard in a diffusers model folder."""
    from safetensors.torch import load_file

    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder / 'config.json'} not found (expected a diffusers model folder)")
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"no .safetensors files in {folder}")
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        state.update(load_file(shard))
    return json.loads((folder / "config.json").read_text()), state


def convert(
    transformer: dict[str, torch.Tensor], controlnets: dict[str, dict[str, torch.Tensor]]
) -> tuple[dict, list[str]]:
    """Map diffusers state dicts to ours; returns (state, unexpected keys)."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[int, torch.Tensor]] = {}
    unexpected: list[str] = []

    def put(ours: str, slot: int | None, value: torch.Tensor) -> None:
        if slot is None:
            out[ours] = value
        else:
            fused.setdefault(ours, {})[slot] = value

    for key, value in transformer.items():
        if key in _TRANSFORMER_TOP:
            put("net." + _TRANSFORMER_TOP[key], None, value)
        elif (m := re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", key)) and m[2] in _BLOCK:
            ours, slot = _BLOCK[m[2]]
            put(f"net.blocks.{m[1]}.{ours}", slot, value)
        else:
            unexpected.append(f"transformer/{key}")

    mismatched = []
    for modality, state in controlnets.items():
        pre = f"controls.{modality}."
        for key, value in state.items():
            if key in _CONTROL_SHARED:
                base = transformer.get(_CONTROL_SHARED[key])
                if base is None or base.shape != value.shape or not torch.equal(base, value):
                    mismatched.append(f"controlnet({modality})/{key}")
            elif key == "patch_embed.proj.weight":
                put(pre + "embed.weight", None, value)
            elif m := re.fullmatch(r"control_blocks\.0\.before_proj\.(weight|bias)", key):
                put(pre + f"before_proj.{m[1]}", None, value)
            elif m := re.fullmatch(r"control_blocks\.(\d+)\.after_proj\.(weight|bias)", key):
                put(pre + f"after_proj.{m[1]}.{m[2]}", None, value)
            elif (m := re.fullmatch(r"control_blocks\.(\d+)\.(.+)", key)) and m[2] in _BLOCK:
                ours, slot = _BLOCK[m[2]]
                put(pre + f"blocks.{m[1]}.{ours}", slot, value)
            else:
                unexpected.append(f"controlnet({modality})/{key}")
    if mismatched:
        raise CheckpointMismatch(
            "these ControlNet tensors should be copies of the transformer's (our control branch reuses the "
            "base's embeddings) but differ: " + ", ".join(sorted(mismatched))
        )
    for ours, parts in fused.items():
        if sorted(parts) == list(range(3 if ours.endswith("qkv.weight") else 2)):
            out[ours] = torch.cat([parts[i] for i in sorted(parts)], dim=0)
        # an incomplete q/k/v set stays out and is reported as missing
    return out, unexpected


def load_diffusers(
    src: str | Path,
    modality: str = "edge",
    extra_controls: dict[str, str] | None = None,
    dtype: torch.dtype | None = None,
) -> Denoiser:
    """A Denoiser from a diffusers-layout directory (`transformer/`, optional `controlnet/`)."""
    src = Path(src)
    t_cfg, t_state = read_folder(src / "transformer")
    control_dirs = {}
    if (src / "controlnet").is_dir():
        control_dirs[modality] = src / "controlnet"
    for name, path in (extra_controls or {}).items():
        control_dirs[name] = Path(path)
    c_cfgs, c_states = {}, {}
    for name, folder in control_dirs.items():
        c_cfgs[name], c_states[name] = read_folder(folder)
    first = next(iter(c_cfgs.values()), None)
    for name, c in c_cfgs.items():
        if c != first:
            raise CheckpointMismatch(f"controlnet {name!r} has a different config from the others")
    cfg = net_config(t_cfg, first, list(control_dirs))
    state, unexpected = convert(t_state, c_states)

    with torch.device("meta"):
        model = Denoiser(cfg)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    wrong = [
        f"{k}: {tuple(v.shape)} vs expected {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if missing or unexpected or wrong:
        lines = []
        if missing:
            lines.append(f"missing ({len(missing)}): " + ", ".join(missing))
        if unexpected:
            lines.append(f"unexpected ({len(unexpected)}): " + ", ".join(sorted(unexpected)))
        if wrong:
            lines.append(f"wrong shape ({len(wrong)}): " + ", ".join(wrong))
        raise CheckpointMismatch(f"checkpoint {src} does not match the network:\n  " + "\n  ".join(lines))
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model


def import_weights(
    src: str, out: str, modality: str = "edge", extra_controls: dict[str, str] | None = None, dtype: str = "keep"
) -> None:
    """Convert a Cosmos-Transfer2.5 / Predict2.5 checkpoint in diffusers layout to vidistill's format.

    Args:
        src: directory with `transformer/` (and, for Transfer2.5, `controlnet/`), each holding
            config.json and *.safetensors, as diffusers saves them.
        out: output directory; receives config.json and model.safetensors (Denoiser.from_pretrained).
        modality: name of the control branch built from `src/controlnet` (edge, blur, depth, seg, keypoint).
        extra_controls: more control branches, modality -> diffusers controlnet folder
            (Transfer2.5 ships one ControlNet per modality).
        dtype: keep (as stored) or a dtype name: float32, bfloat16, ... (modules/dtypes.py).
    """
    from modules.dtypes import to_dtype

    model = load_diffusers(src, modality, extra_controls, None if dtype == "keep" else to_dtype(dtype, "--dtype"))
    model.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    print(f"imported {n / 1e6:.1f}M parameters ({', '.join(model.controls) or 'no controls'}) -> {out}")
