"""`vidistill bench`: step time, peak memory and MFU of our network against a named peer.

Kept apart from every training and inference path so measuring never changes them. The peer is
diffusers' CosmosTransformer3DModel + CosmosControlNetModel built with the configuration of
../shared/bench/peer_diffusers_cosmos.py (2B shape, 4 control blocks, bf16, gradient
checkpointing, base frozen, AdamW on the control branch), fed the same inputs, in the same process.
Times are medians over `steps` runs after one warm-up run.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import platform
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F

from modules.denoiser import Cond, Denoiser
from modules.nets import preset as net_preset
from modules.nets import forward_flops, set_backend

# latent grids (T, H, W) of the Wan2.1 tokenizer (4x8x8) for 93 frames
SHAPES = {"480p_93f": (24, 60, 104), "720p_93f": (24, 88, 160)}
TEXT_TOKENS = 512


def parse_shape(name: str) -> tuple[int, int, int]:
    """A named shape or a latent grid written TxHxW."""
    if name in SHAPES:
        return SHAPES[name]
    try:
        t, h, w = (int(v) for v in name.split("x"))
    except ValueError:
        raise ValueError(f"shape {name!r} is neither one of {', '.join(SHAPES)} nor a latent grid TxHxW") from None
    return t, h, w


def timed(fn: Callable[[], None], steps: int, device: torch.device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(steps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def make_inputs(cfg, grid, device, dtype, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    T, H, W = grid
    C = cfg.dit.latent_channels
    r = lambda *s: torch.randn(*s, device=device, dtype=dtype, generator=g)
    return dict(x=r(1, C, T, H, W), ctrl=r(1, C, T, H, W), text=r(1, TEXT_TOKENS, cfg.dit.text_dim),
                target=r(1, C, T, H, W), t=torch.full((1,), 0.5, device=device, dtype=dtype),
                cond_mask=torch.zeros(1, 1, T, H, W, device=device, dtype=dtype),
                pad=torch.zeros(1, 1, H * 8, W * 8, device=device, dtype=dtype))


class Ours:
    name = "vidistill"

    def __init__(self, cfg, device, dtype, checkpointing: bool):
        self.model = Denoiser.build(cfg, device=device, dtype=dtype)
        self.model.net.requires_grad_(False)
        for block in [*self.model.net.blocks, *self.model.controls["edge"].blocks]:
            block.checkpoint = checkpointing
        self.params = list(self.model.controls.parameters())

    def forward(self, x):
        cond = Cond(text=x["text"], controls={"edge": x["ctrl"]}, padding_mask=x["pad"])
        return self.model.velocity(x["x"], x["t"], cond)


class Diffusers:
    name = "diffusers"

    def __init__(self, cfg, device, dtype, checkpointing: bool):
        from diffusers import CosmosControlNetModel, CosmosTransformer3DModel

        d, c = cfg.dit, cfg.control
        self.tr = CosmosTransformer3DModel(
            in_channels=d.latent_channels + 1, out_channels=d.latent_channels, num_attention_heads=d.heads,
            attention_head_dim=d.head_dim, num_layers=d.depth, text_embed_dim=d.text_dim,
            adaln_lora_dim=d.adaln_lora_dim, controlnet_block_every_n=c.every, concat_padding_mask=True,
            extra_pos_embed_type=None).to(device, dtype)
        self.cn = CosmosControlNetModel(
            n_controlnet_blocks=c.blocks, in_channels=c.channels + 2, latent_channels=d.latent_channels + 2,
            model_channels=d.dim, num_attention_heads=d.heads, attention_head_dim=d.head_dim,
            text_embed_dim=d.text_dim).to(device, dtype)
        self.tr.requires_grad_(False)
        if checkpointing:
            self.tr.enable_gradient_checkpointing()
            self.cn.enable_gradient_checkpointing()
        self.params = list(self.cn.parameters())

    def forward(self, x):
        res = self.cn(controls_latents=x["ctrl"], latents=x["x"], timestep=x["t"], encoder_hidden_states=x["text"],
                      condition_mask=x["cond_mask"], padding_mask=x["pad"], return_dict=False)[0]
        return self.tr(hidden_states=x["x"], timestep=x["t"], encoder_hidden_states=x["text"],
                       block_controlnet_hidden_states=res, condition_mask=x["cond_mask"], padding_mask=x["pad"],
                       return_dict=False)[0]


def measure(impl, cfg, grids, device, steps, peak_tflops) -> list[dict]:
    opt = torch.optim.AdamW(impl.params, lr=1e-5)
    rows = []
    for shape, grid in grids.items():
        x = make_inputs(cfg, grid, device, next(iter(impl.params)).dtype)
        tokens = grid[0] * (grid[1] // cfg.dit.patch[1]) * (grid[2] // cfg.dit.patch[2])

        def train_step():
            loss = F.mse_loss(impl.forward(x).float(), x["target"].float())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        @torch.no_grad()
        def infer():
            impl.forward(x)

        reset_peak(device)
        train_s = timed(train_step, steps, device)
        train_mem = peak_gib(device)
        reset_peak(device)
        infer_s = timed(infer, steps, device)
        infer_mem = peak_gib(device)
        flops = forward_flops(cfg.dit.dim, tokens, cfg.dit.depth + cfg.control.blocks, TEXT_TOKENS)
        mfu = (lambda f, s: round(f / s / (peak_tflops * 1e12), 3)) if device.type == "cuda" else (lambda f, s: None)
        rows.append(dict(impl=impl.name, shape=shape, tokens=tokens, train_step_s=round(train_s, 3),
                         train_peak_GiB=train_mem and round(train_mem, 1), train_mfu=mfu(3 * flops, train_s),
                         infer_fwd_s=round(infer_s, 3), infer_peak_GiB=infer_mem and round(infer_mem, 1),
                         infer_mfu=mfu(flops, infer_s)))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def bench(
    mode: str = "net",
    preset: str = "2b",
    shapes: str = "480p_93f,720p_93f",
    peer: str | None = None,
    steps: int = 2,
    device: str = "cuda",
    dtype: str = "bfloat16",
    checkpointing: bool = True,
    attention_backend: str = "auto",
    peak_tflops: float = 790.0,
    shards: str | None = None,
    resolutions: str = "480p,720p",
    num_frames: int = 93,
    seconds: float = 20.0,
    edge: str = "both",
    workers: int = 1,
    teacher_steps: int = 35,
    guidance: float = 3.0,
    student_steps: int = 4,
    decode: str = "wan2.1",
    modalities: str = "edge",
) -> list[dict]:
    """Time a control-training step and an inference forward of a preset, optionally against a peer.

    The training step runs base + control forward, an MSE loss, backward and AdamW on the control
    branch (base frozen); the inference forward is base + control without gradients.

    `--mode data` instead measures data loading: decoded clips per second per worker
    (tools/bench_data.py), with and without on-the-fly edge extraction.

    `--mode generation` times end-to-end sampling, teacher (CFG, many steps) against student
    (few steps), plus decoding (tools/bench_generation.py).

    Args:
        mode: net (the network against its peer), data (clip decoding throughput) or generation
            (teacher vs student sampling time).
        preset: network preset (tiny, small, 2b, 14b); the text projection is left out, as in the peer.
        shapes: comma-separated named shapes (480p_93f, 720p_93f) or latent grids TxHxW.
        peer: "diffusers" to also run diffusers' Cosmos transformer + controlnet of the same configuration.
        steps: timed runs per measurement (median), after one warm-up.
        device: cuda or cpu (cpu only for smoke tests).
        dtype: parameter and activation dtype (bfloat16 or float32).
        checkpointing: activation checkpointing of every block, in both implementations.
        attention_backend: SDPA backend for ours (auto, flash, cudnn, efficient, math).
        peak_tflops: the GPU's dense bf16 peak for MFU (H200/H100 SXM: about 790 by the peer's convention).
        shards: data mode: shards whose videos are decoded (None: synthetic source videos).
        resolutions: data mode: comma-separated 480p, 720p or HxW.
        num_frames: data mode: frames per clip.
        seconds: data mode: measuring time per configuration.
        edge: data mode: on, off or both (edge extraction on the fly).
        workers: data mode: parallel worker processes.
        teacher_steps: generation mode: Euler steps of the teacher.
        guidance: generation mode: the teacher's CFG weight (0: one network call per step, else two).
        student_steps: generation mode: student steps, t-list evenly spaced from 1.0 down.
        decode: generation mode: wan2.1 (random full-size VAE, needs diffusers), pixel (CPU tests) or none.
        modalities: generation mode: comma-separated control branches, each given random control latents.
    """
    if mode == "data":
        from tools.bench_data import bench_data

        return bench_data(shards, resolutions, num_frames, seconds, edge, workers)
    if mode == "generation":
        from tools.bench_generation import bench_generation

        return bench_generation(preset, shapes, steps, device, dtype, teacher_steps, guidance, student_steps,
                                decode, modalities, attention_backend)
    if mode != "net":
        raise ValueError(f"mode must be net, data or generation, got {mode!r}")
    if peer not in (None, "diffusers"):
        raise ValueError(f"unknown peer {peer!r}; the only peer is 'diffusers'")
    dev = torch.device(device)
    dt = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    cfg = net_preset(preset, text_proj_in=None)
    grids = {s: parse_shape(s) for s in shapes.split(",")}
    set_backend(attention_backend)
    header = dict(command="vidistill " + " ".join(sys.argv[1:]), torch=torch.__version__, python=platform.python_version(),
                  device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
                  preset=preset, config=dataclasses.asdict(cfg.dit), control=dataclasses.asdict(cfg.control))
    if peer:
        import diffusers

        header["diffusers"] = diffusers.__version__
    print(json.dumps(header), flush=True)

    rows = []
    for impl_cls in [Ours] + ([Diffusers] if peer else []):
        impl = impl_cls(cfg, dev, dt, checkpointing)
        rows += measure(impl, cfg, grids, dev, steps, peak_tflops)
        del impl
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    print(format_table(rows))
    return rows


def format_table(rows: list[dict]) -> str:
    """Markdown table; ratio = peer time / our time (above 1: we are faster)."""
    lines = ["| shape | impl | train step s | train peak GiB | train MFU | infer fwd s | infer peak GiB | infer MFU |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['impl']} | {r['train_step_s']} | {r['train_peak_GiB']} | {r['train_mfu']} "
                     f"| {r['infer_fwd_s']} | {r['infer_peak_GiB']} | {r['infer_mfu']} |")
    ours = {r["shape"]: r for r in rows if r["impl"] == "vidistill"}
    peers = [r for r in rows if r["impl"] != "vidistill"]
    if peers:
        lines.append("")
    for r in peers:
        o = ours[r["shape"]]
        lines.append(f"{r['shape']}: speed-up vs {r['impl']}: train {r['train_step_s'] / o['train_step_s']:.2f}x, "
                     f"inference {r['infer_fwd_s'] / o['infer_fwd_s']:.2f}x")
    return "\n".join(lines)
