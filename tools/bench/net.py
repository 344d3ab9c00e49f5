"""`vidistill bench --mode net`: step time, peak memory and MFU of our network against a named peer.

Kept apart from every training and inference path so measuring never changes them. The peer is
diffusers' CosmosTransformer3DModel + CosmosControlNetModel built as a control-training step of
the same model (2B shape, 4 control blocks, bf16, gradient checkpointing, base frozen, AdamW on
the control branch), fed the same inputs, in the same process, twice: eager (diffusers as shipped)
and with every transformer and control block compiled in place, the peer at its best, against
which the table's ratios are given.
Times are medians over `steps` runs after one warm-up run (which pays the compilation).
"""

from __future__ import annotations

import dataclasses
import json

import torch

from modules.nets import preset as net_preset
from modules.nets import set_backend
from modules.nets.dit import checkpoint_plan
from tools.bench.common import Options, Variant, free, header, parse_shapes, plan_variants
from tools.bench.control import Ours, measure

# Dynamo's compiled versions per function that the compiled peer may keep: its transformer and
# control blocks share one forward, run with and without a control residual, with and without
# gradients, with inputs that do or do not require them (9 versions in the tiny CPU test); past
# torch's default limit of 8 the rest would run eagerly unnoticed
PEER_RECOMPILE_LIMIT = 64


class Diffusers:
    name = "diffusers"
    sparse = None  # the peer attends densely

    def __init__(self, cfg, device, dtype, checkpointing: bool):
        from diffusers import CosmosControlNetModel, CosmosTransformer3DModel

        d, c = cfg.dit, cfg.control
        self.tr = CosmosTransformer3DModel(
            in_channels=d.latent_channels + 1,
            out_channels=d.latent_channels,
            num_attention_heads=d.heads,
            attention_head_dim=d.head_dim,
            num_layers=d.depth,
            text_embed_dim=d.text_dim,
            adaln_lora_dim=d.adaln_lora_dim,
            controlnet_block_every_n=c.every,
            concat_padding_mask=True,
            extra_pos_embed_type=None,
        ).to(device, dtype)
        self.cn = CosmosControlNetModel(
            n_controlnet_blocks=c.blocks,
            in_channels=c.channels + 2,
            latent_channels=d.latent_channels + 2,
            model_channels=d.dim,
            num_attention_heads=d.heads,
            attention_head_dim=d.head_dim,
            text_embed_dim=d.text_dim,
        ).to(device, dtype)
        self.tr.requires_grad_(False)
        if checkpointing:
            self.tr.enable_gradient_checkpointing()
            self.cn.enable_gradient_checkpointing()
        self.params = list(self.cn.parameters())
        self.checkpointing = "full checkpointing" if checkpointing else "no checkpointing"
        self.compiled = False
        self.variant = f"diffusers eager ({self.checkpointing})"

    def blocks(self) -> list[torch.nn.Module]:
        return [*self.tr.transformer_blocks, *self.cn.control_blocks]

    def compile(self, backend: str = "inductor") -> None:
        """torch.compile every transformer and control block in place, as our `--compile` compiles
        ours: diffusers' own forward and checkpointing call each block's `__call__`, which then runs
        the compiled version (inside the checkpoint, which wraps the block)."""
        for block in self.blocks():
            block.compile(backend=backend)
        self.compiled = True
        self.variant = f"diffusers compiled ({self.checkpointing})"

    def forward(self, x):
        res = self.cn(
            controls_latents=x["ctrl"],
            latents=x["x"],
            timestep=x["t"],
            encoder_hidden_states=x["text"],
            condition_mask=x["cond_mask"],
            padding_mask=x["pad"],
            return_dict=False,
        )[0]
        return self.tr(
            hidden_states=x["x"],
            timestep=x["t"],
            encoder_hidden_states=x["text"],
            block_controlnet_hidden_states=res,
            condition_mask=x["cond_mask"],
            padding_mask=x["pad"],
            return_dict=False,
        )[0]


def bench_net(
    opts: Options, peer: str | None = None, infer: bool = True, peer_compile_backend: str = "inductor"
) -> list[dict]:
    """Time the control-training step and the inference forward of ours per configuration
    (the options' own, then `opts.variants`) and shape, after the peer's, eager then compiled with
    `peer_compile_backend`, when `peer` is given; print JSON rows and a table; return the rows."""
    if peer not in (None, "diffusers"):
        raise ValueError(f"unknown peer {peer!r}; the only peer is 'diffusers'")
    dev, dt = opts.torch_device, opts.torch_dtype
    cfg = net_preset(opts.preset, text_proj_in=None)
    runs = plan_variants(opts, infer)
    set_backend("auto")  # the peer uses SDPA as torch chooses, as its reference script does
    print(json.dumps(net_header(opts, cfg, dev, dt, peer, peer_compile_backend)), flush=True)
    # the peer first: if a long list of variants runs out of time, the reference is already measured
    rows = measure_peer(opts, cfg, runs[0], dev, dt, peer_compile_backend) if peer else []
    rows += measure_ours(opts, cfg, runs, dev, dt)
    print(format_table(rows))
    return rows


def net_header(
    opts: Options, cfg, dev: torch.device, dt: torch.dtype, peer: str | None, peer_backend: str = "inductor"
) -> dict:
    head = header(
        None,
        dev,
        preset=opts.preset,
        config=dataclasses.asdict(cfg.dit),
        control=dataclasses.asdict(cfg.control),
    )
    if dev.type == "cuda":
        head["cudnn"] = torch.backends.cudnn.version()
        if (auto := sdpa_auto(cfg, dev, dt)) is not None:
            head["sdpa_auto"] = auto
    if peer:
        import diffusers

        head["diffusers"] = diffusers.__version__
        head.update(peer_compile_backend=peer_backend, peer_recompile_limit=peer_recompile_limit())
    return head


def recompile_limit_name() -> str:
    """Dynamo's setting for the compiled versions kept per function (`cache_size_limit` before torch 2.6)."""
    return "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"


def peer_recompile_limit() -> int:
    """The limit the compiled peer runs under: PEER_RECOMPILE_LIMIT, or the session's if higher."""
    return max(getattr(torch._dynamo.config, recompile_limit_name()), PEER_RECOMPILE_LIMIT)


def sdpa_auto(cfg, dev: torch.device, dt: torch.dtype) -> str | None:
    """The SDPA backend "auto" picks for our attention shape (None where torch cannot say): torch
    prefers cuDNN over its own priority list on sm90/sm100 with a recent enough cuDNN, so that
    list cannot tell."""
    try:
        from torch.nn.attention import SDPBackend

        q = torch.zeros(1, cfg.dit.heads, 256, cfg.dit.head_dim, device=dev, dtype=dt)
        names = {int(b): name for name, b in SDPBackend.__members__.items()}
        return names.get(int(torch._fused_sdp_choice(q, q, q)), "unknown")
    except (AttributeError, RuntimeError, TypeError):
        return None


def measure_peer(
    opts: Options, cfg, base: Variant, dev: torch.device, dt: torch.dtype, backend: str = "inductor"
) -> list[dict]:
    """The peer at its reference setting (full checkpointing of every block unless ours has none),
    eager as diffusers ships it, then with its blocks compiled in place (`backend`), so that our
    compiled blocks are compared with a compiled peer; the recompile limit is raised for the
    compiled peer only and restored afterwards."""
    impl = Diffusers(cfg, dev, dt, any(checkpoint_plan(base.checkpointing, 1)))
    grids = parse_shapes(opts.shapes)
    rows = measure(impl, cfg, grids, dev, opts.steps, opts.peak_tflops, base.infer, opts.profile)
    impl.compile(backend)
    with torch._dynamo.config.patch(**{recompile_limit_name(): peer_recompile_limit()}):
        rows += measure(impl, cfg, grids, dev, opts.steps, opts.peak_tflops, base.infer, opts.profile)
    del impl
    free(dev)
    return rows


def measure_ours(opts: Options, cfg, runs: list[Variant], dev: torch.device, dt: torch.dtype) -> list[dict]:
    """Every configuration in `runs` on one network, switched in place between them."""
    impl = Ours(cfg, dev, dt, runs[0])
    rows = []
    for v in runs:
        impl.configure(v)
        grids = parse_shapes(v.shapes or opts.shapes)
        profile = opts.profile if v.profile else None
        rows += measure(impl, cfg, grids, dev, v.steps or opts.steps, opts.peak_tflops, v.infer, profile)
    del impl
    free(dev)
    return rows


def format_table(rows: list[dict]) -> str:
    """Markdown table, then one speed-up line per configuration of ours and shape (see speed_up)."""
    lines = [
        "| shape | impl | variant | train step s | train peak GiB | train MFU | infer fwd s | infer peak GiB "
        "| infer MFU |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['shape']} | {r['impl']} | {r['variant']} | {r['error']} | | | | | |")
            continue
        lines.append(
            f"| {r['shape']} | {r['impl']} | {r['variant']} | {r['train_step_s']} | {r['train_peak_GiB']} "
            f"| {r['train_mfu']} | {r['infer_fwd_s']} | {r['infer_peak_GiB']} | {r['infer_mfu']} |"
        )
    peers = [r for r in rows if r["impl"] != "vidistill"]
    ours = [r for r in rows if r["impl"] == "vidistill" and not r.get("error")]
    speed = [line for o in ours if (line := speed_up(o, [p for p in peers if p["shape"] == o["shape"]]))]
    return "\n".join(lines + [""] + speed if speed else lines)


def speed_up(ours: dict, peers: list[dict]) -> str | None:
    """Ratios peer time / our time (above 1: we are faster) against the compiled peer, the peer at
    its best, with the eager peer's beside them; against the eager peer, saying why, where the
    compiled one has no row of this shape or an error (e.g. out of memory). None without a peer."""
    eager = next((p for p in peers if not p.get("compiled") and not p.get("error")), None)
    compiled = next((p for p in peers if p.get("compiled")), None)
    if compiled and not compiled.get("error"):
        ref, beside, against = compiled, eager, f"{compiled['impl']} compiled"
    elif eager:
        why = compiled["error"] if compiled else "not measured"
        ref, beside, against = eager, None, f"{eager['impl']} eager (compiled peer: {why})"
    else:
        return None
    parts = []
    for what, key in (("train", "train_step_s"), ("inference", "infer_fwd_s")):
        if ours[key] and ref[key]:
            eager_ratio = f" (vs eager {beside[key] / ours[key]:.2f}x)" if beside and beside[key] else ""
            parts.append(f"{what} {ref[key] / ours[key]:.2f}x{eager_ratio}")
    return f"{ours['shape']} [{ours['variant']}]: vs {against}: {', '.join(parts)}"
