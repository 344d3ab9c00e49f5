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
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from modules.denoiser import Cond, Denoiser
from modules.nets import forward_flops, set_backend
from modules.nets import preset as net_preset
from modules.nets.dit import checkpoint_plan

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


def timed(fn: Callable[[], None], steps: int, device: torch.device, warmup: Callable[[], None] | None = None) -> float:
    """Median seconds of `steps` runs of fn after one warm-up run (of `warmup` if given: a cheaper
    call that builds the same kernels, for measurements too long to run twice)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    (warmup or fn)()
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
    return dict(
        x=r(1, C, T, H, W),
        ctrl=r(1, C, T, H, W),
        text=r(1, TEXT_TOKENS, cfg.dit.text_dim),
        target=r(1, C, T, H, W),
        t=torch.full((1,), 0.5, device=device, dtype=dtype),
        cond_mask=torch.zeros(1, 1, T, H, W, device=device, dtype=dtype),
        pad=torch.zeros(1, 1, H * 8, W * 8, device=device, dtype=dtype),
    )


@dataclasses.dataclass
class Variant:
    """One configuration of our network and what to measure of it (`--variants` switches these)."""

    checkpointing: str = "full"
    compile: bool = False
    attention_backend: str = "auto"
    infer: bool = True
    """Also time the inference forward (checkpointing does not change it)."""
    shapes: str | None = None
    """Shapes, `+`-separated inside a variant (None: the bench's --shapes)."""
    steps: int | None = None
    """Timed runs (None: the bench's --steps)."""
    profile: bool = True
    """Profile a training step when the bench has --profile."""

    def label(self) -> str:
        return f"ckpt={self.checkpointing} attn={self.attention_backend} compile={int(self.compile)}"


def parse_variants(spec: str | None, base: Variant) -> list[Variant]:
    """`key=value,key=value;...` (keys: the Variant fields) -> variants, each starting from `base`."""
    fields = {f.name for f in dataclasses.fields(Variant)}
    out = []
    for part in filter(None, (p.strip() for p in (spec or "").split(";"))):
        kw: dict = {}
        for item in filter(None, (i.strip() for i in part.split(","))):
            key, eq, value = item.partition("=")
            if not eq or key not in fields:
                raise ValueError(f"variant item {item!r} is not key=value with a key of {sorted(fields)}")
            if key in ("compile", "infer", "profile"):
                kw[key] = value.lower() in ("1", "true", "yes")
            elif key == "steps":
                kw[key] = int(value)
            elif key == "shapes":
                kw[key] = value.replace("+", ",")
            else:
                kw[key] = value
        out.append(dataclasses.replace(base, **kw))
    return out


class Ours:
    name = "vidistill"

    def __init__(self, cfg, device, dtype, variant: Variant):
        self.model = Denoiser.build(cfg, device=device, dtype=dtype)
        self.model.net.requires_grad_(False)
        self.params = list(self.model.controls.parameters())
        self.configure(variant)

    def configure(self, variant: Variant) -> None:
        # the training stages' own switches, so the bench measures what a recipe would run
        from modules.parallel import set_checkpointing, set_compile

        set_checkpointing(self.model, variant.checkpointing)
        set_compile(self.model, variant.compile)
        set_backend(variant.attention_backend)
        self.variant = variant.label()

    def forward(self, x):
        cond = Cond(text=x["text"], controls={"edge": x["ctrl"]}, padding_mask=x["pad"])
        return self.model.velocity(x["x"], x["t"], cond)


class Diffusers:
    name = "diffusers"
    variant = "diffusers defaults (full checkpointing)"

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


def measure(impl, cfg, grids, device, steps, peak_tflops, infer=True, profile: str | None = None) -> list[dict]:
    """One row per shape; a shape that runs out of GPU memory gives a row with `error` and the
    next measurement goes on. `profile`: a folder for a profile of the last shape's training step."""
    opt = torch.optim.AdamW(impl.params, lr=1e-5)
    rows = []
    for shape, grid in grids.items():
        try:
            rows.append(
                measure_shape(
                    impl,
                    opt,
                    cfg,
                    shape,
                    grid,
                    device,
                    steps,
                    peak_tflops,
                    infer,
                    profile if shape == list(grids)[-1] else None,
                )
            )
        except torch.OutOfMemoryError as e:
            opt.zero_grad(set_to_none=True)
            rows.append(
                dict(
                    impl=impl.name,
                    variant=impl.variant,
                    shape=shape,
                    error="out of memory: " + str(e).split(".")[0],
                    train_step_s=None,
                    train_peak_GiB=None,
                    train_mfu=None,
                    infer_fwd_s=None,
                    infer_peak_GiB=None,
                    infer_mfu=None,
                )
            )
            print(json.dumps(rows[-1]), flush=True)
        free(device)
    return rows


def measure_shape(impl, opt, cfg, shape, grid, device, steps, peak_tflops, infer, profile) -> dict:
    x = make_inputs(cfg, grid, device, next(iter(impl.params)).dtype)
    tokens = grid[0] * (grid[1] // cfg.dit.patch[1]) * (grid[2] // cfg.dit.patch[2])

    def train_step():
        loss = F.mse_loss(impl.forward(x).float(), x["target"].float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def infer_fwd():
        impl.forward(x)

    reset_peak(device)
    train_s = timed(train_step, steps, device)
    train_mem = peak_gib(device)
    infer_s = infer_mem = None
    if infer:
        reset_peak(device)
        infer_s = timed(infer_fwd, steps, device)
        infer_mem = peak_gib(device)
    flops = forward_flops(cfg.dit.dim, tokens, cfg.dit.depth + cfg.control.blocks, TEXT_TOKENS)

    def mfu(f: float, sec: float | None) -> float | None:
        return round(f / sec / (peak_tflops * 1e12), 3) if device.type == "cuda" and sec else None

    row = dict(
        impl=impl.name,
        variant=impl.variant,
        shape=shape,
        tokens=tokens,
        train_step_s=round(train_s, 3),
        train_peak_GiB=train_mem and round(train_mem, 1),
        train_mfu=mfu(3 * flops, train_s),
        infer_fwd_s=infer_s and round(infer_s, 3),
        infer_peak_GiB=infer_mem and round(infer_mem, 1),
        infer_mfu=mfu(flops, infer_s),
    )
    print(json.dumps(row), flush=True)
    if profile:
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{impl.name}_{shape}_{impl.variant}").strip("_")
        write_profile(train_step, device, Path(profile) / f"{name}.txt", row)
    return row


def write_profile(step: Callable[[], None], device: torch.device, path: Path, row: dict, top: int = 30) -> None:
    """One training step under torch.profiler: the `top` kernels/ops by self device time, to `path` and stdout."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=top, max_name_column_width=70)
    text = f"# {row['impl']} {row['variant']} {row['shape']}: one training step\n{table}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(text, flush=True)


def bench(
    mode: str = "net",
    preset: str = "2b",
    shapes: str | None = None,
    peer: str | None = None,
    steps: int = 2,
    device: str = "cuda",
    dtype: str = "bfloat16",
    checkpointing: str | bool = "full",
    attention_backend: str = "auto",
    compile: bool = False,
    infer: bool = True,
    variants: str | None = None,
    profile: str | None = None,
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
    decode_channels_last: bool = False,
    decode_compile: bool = False,
    modalities: str = "edge",
    student_trainable: str = "all",
    parts: str = "control,cp_train,cp_infer,dmd2",
    context_parallel: int = 2,
    dmd2_shapes: str = "480p_93f",
    dmd2_checkpointing: str = "full",
) -> list[dict]:
    """Time a control-training step and an inference forward of a preset, optionally against a peer.

    The training step runs base + control forward, an MSE loss, backward and AdamW on the control
    branch (base frozen); the inference forward is base + control without gradients.

    `--mode data` instead measures data loading: decoded clips per second per worker
    (tools/bench_data.py), with and without on-the-fly edge extraction.

    `--mode generation` times end-to-end sampling, teacher (CFG, many steps) against student
    (few steps), plus decoding (tools/bench_generation.py).

    `--mode dmd2` times, in one process with the same inputs, the control-training step above
    (ours), one DMD2 student turn and one critic turn of the DMD2 stage's own code at the full
    backward simulation, and each turn's ratio to the control step (tools/bench_dmd2.py).

    `--mode scale` (under torchrun, 2 or more processes) measures data parallelism (FSDP2) and
    context parallelism against one GPU in the same run: control-training throughput, DMD2
    turns, a context-parallel training step and inference per step (tools/bench_scale.py).

    Args:
        mode: net (the network against its peer), data (clip decoding throughput), generation
            (teacher vs student sampling time), dmd2 (DMD2 turns against the control step) or
            scale (several GPUs against one).
        preset: network preset (tiny, small, 2b, 14b); the text projection is left out, as in the peer.
        shapes: comma-separated named shapes (480p_93f, 720p_93f) or latent grids TxHxW; none:
            480p_93f for dmd2, else 480p_93f,720p_93f.
        peer: "diffusers" to also run diffusers' Cosmos transformer + controlnet of the same configuration.
        steps: timed runs per measurement (median), after one warm-up.
        device: cuda or cpu (cpu only for smoke tests).
        dtype: parameter and activation dtype (bfloat16 or float32).
        checkpointing: ours: none, full, selective, attention (keep only attention outputs),
            partial:N (full on the first N blocks in execution order, control blocks first, none
            on the rest) or partial:N:REST (modules.nets.dit.checkpoint_plan); true/false mean
            full/none. The peer keeps its reference setting, full checkpointing of every block,
            unless this is none/false. dmd2 mode: the control step's network and the blocks of
            all DMD2 networks (student, teacher, fake score; the GAN head has none).
        attention_backend: SDPA backend for ours (auto, flash, cudnn, efficient, math).
        compile: torch.compile each of our blocks (inductor), as `sharding.compile` does in training;
            the warm-up run pays the compilation. dmd2 mode: every network's blocks.
        infer: also time the inference forward (ours and the peer); false halves a training-only comparison.
        variants: further configurations of ours measured after the first, in the same process and
            against the same peer: `key=value,...` separated by `;`, keys checkpointing, compile,
            attention_backend and infer (false: skip the inference forward), each starting from
            the options above, e.g. "attention_backend=flash;checkpointing=partial:20,infer=false";
            also shapes (`+`-separated), steps and profile (true/false) per variant. The peer runs first.
            dmd2 mode: keys checkpointing, compile, attention_backend, shapes and steps, each
            applied to the control step and to both turns.
        profile: a folder: after each measurement, profile one more training step of its last
            shape and write the top kernels by device time there (and to stdout).
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
        decode_channels_last: generation mode: the Wan VAE's 3D convolutions run channels-last
            (WanTokenizer's `channels_last`).
        decode_compile: generation mode: torch.compile the Wan VAE's decoder (WanTokenizer's `compile`).
        modalities: generation mode: comma-separated control branches, each given random control latents.
        student_trainable: dmd2 mode: the student's trained parameters, all (base + control, the
            2b dmd2 recipe's) or control (the control branch only).
        parts: scale mode: comma-separated control (data-parallel throughput), cp_train (one
            sample split across context_parallel ranks), cp_infer (inference per step) and dmd2.
        context_parallel: scale mode: ranks one sample is split over.
        dmd2_shapes: scale mode: the shapes of the DMD2 turns (the other parts use --shapes,
            default 720p_93f).
        dmd2_checkpointing: scale mode: the DMD2 networks' checkpointing (the dmd2 recipe's full).
    """
    ckpt = {"true": "full", "false": "none"}.get(str(checkpointing).lower(), str(checkpointing))
    if mode == "scale":
        from tools.bench_scale import bench_scale

        return bench_scale(
            preset,
            shapes or "720p_93f",
            dmd2_shapes,
            steps,
            device,
            dtype,
            ckpt,
            dmd2_checkpointing,
            compile,
            parts,
            context_parallel,
            profile,
        )
    if shapes is None:
        shapes = "480p_93f" if mode == "dmd2" else "480p_93f,720p_93f"
    if mode == "data":
        from tools.bench_data import bench_data

        return bench_data(shards, resolutions, num_frames, seconds, edge, workers)
    if mode == "generation":
        from tools.bench_generation import bench_generation

        return bench_generation(
            preset,
            shapes,
            steps,
            device,
            dtype,
            teacher_steps,
            guidance,
            student_steps,
            decode,
            modalities,
            attention_backend,
            compile=compile,
            decode_channels_last=decode_channels_last,
            decode_compile=decode_compile,
        )
    if mode == "dmd2":
        from tools.bench_dmd2 import bench_dmd2

        return bench_dmd2(
            preset,
            shapes,
            steps,
            device,
            dtype,
            ckpt,
            compile,
            attention_backend,
            variants,
            student_trainable,
            peak_tflops,
        )
    if mode != "net":
        raise ValueError(f"mode must be net, data, generation, dmd2 or scale, got {mode!r}")
    if peer not in (None, "diffusers"):
        raise ValueError(f"unknown peer {peer!r}; the only peer is 'diffusers'")
    dev = torch.device(device)
    dt = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    cfg = net_preset(preset, text_proj_in=None)
    grids = {s: parse_shape(s) for s in shapes.split(",")}
    base = Variant(checkpointing=ckpt, compile=compile, attention_backend=attention_backend, infer=infer)
    runs = [base] + parse_variants(variants, base)
    for v in runs:  # refuse a bad option before minutes of measuring
        checkpoint_plan(v.checkpointing, 1)
        set_backend(v.attention_backend)
        for s in (v.shapes or shapes).split(","):
            parse_shape(s)
    set_backend("auto")  # the peer uses SDPA as torch chooses, as its reference script does
    peer_ckpt = any(checkpoint_plan(base.checkpointing, 1))
    header = dict(
        command="vidistill " + " ".join(sys.argv[1:]),
        torch=torch.__version__,
        python=platform.python_version(),
        device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        preset=preset,
        config=dataclasses.asdict(cfg.dit),
        control=dataclasses.asdict(cfg.control),
    )
    if dev.type == "cuda":
        header["cudnn"] = torch.backends.cudnn.version()
        # the backend "auto" picks for our attention shape: torch prefers cuDNN over its own
        # priority list on sm90/sm100 with a recent enough cuDNN, so that list cannot tell
        try:
            from torch.nn.attention import SDPBackend

            q = torch.zeros(1, cfg.dit.heads, 256, cfg.dit.head_dim, device=dev, dtype=dt)
            names = {int(b): name for name, b in SDPBackend.__members__.items()}
            header["sdpa_auto"] = names.get(int(torch._fused_sdp_choice(q, q, q)), "unknown")
        except (AttributeError, RuntimeError, TypeError):
            pass
    if peer:
        import diffusers

        header["diffusers"] = diffusers.__version__
    print(json.dumps(header), flush=True)

    rows = []
    # the peer first: if a long list of variants runs out of time, the reference is already measured
    if peer:
        impl = Diffusers(cfg, dev, dt, peer_ckpt)
        rows += measure(impl, cfg, grids, dev, steps, peak_tflops, base.infer, profile)
        del impl
        free(dev)
    impl = Ours(cfg, dev, dt, base)
    for v in runs:
        impl.configure(v)
        v_grids = {s: parse_shape(s) for s in v.shapes.split(",")} if v.shapes else grids
        rows += measure(impl, cfg, v_grids, dev, v.steps or steps, peak_tflops, v.infer, profile if v.profile else None)
    del impl
    free(dev)
    print(format_table(rows))
    return rows


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def format_table(rows: list[dict]) -> str:
    """Markdown table; ratio = peer time / our time (above 1: we are faster), one line per
    configuration of ours and shape."""
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
    peers = {r["shape"]: r for r in rows if r["impl"] != "vidistill" and not r.get("error")}
    if peers:
        lines.append("")
    for o in rows:
        p = peers.get(o["shape"])
        if o["impl"] != "vidistill" or p is None or o.get("error"):
            continue
        infer = f", inference {p['infer_fwd_s'] / o['infer_fwd_s']:.2f}x" if o["infer_fwd_s"] else ""
        lines.append(
            f"{o['shape']} [{o['variant']}]: speed-up vs {p['impl']}: "
            f"train {p['train_step_s'] / o['train_step_s']:.2f}x{infer}"
        )
    return "\n".join(lines)
