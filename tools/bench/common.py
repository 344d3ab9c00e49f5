"""What the `vidistill bench` modes share: the options, shapes and inputs, timing and peak memory,
our network's variants, the run's header and profiles. Imports no mode module."""

from __future__ import annotations

import dataclasses
import gc
import platform
import sys
import time
from collections.abc import Callable

import torch

from modules.dtypes import to_dtype
from modules.nets import PEAK_TFLOPS, SparseAttention, set_backend
from modules.nets.dit import checkpoint_plan

# latent grids (T, H, W) of the Wan2.1 tokenizer (4x8x8) for 93 frames
SHAPES = {"480p_93f": (24, 60, 104), "720p_93f": (24, 88, 160)}
TEXT_TOKENS = 512

Grid = tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class Options:
    """The options the network-timing modes (net, dmd2, generation, scale) share; each field is
    `vidistill bench`'s flag of the same name (checkpointing already normalised: true/false are
    full/none)."""

    preset: str = "2b"
    shapes: str = "480p_93f"
    steps: int = 2
    device: str = "cuda"
    dtype: str = "bfloat16"
    checkpointing: str = "full"
    compile: bool = False
    attention_backend: str = "auto"
    variants: str | None = None
    profile: str | None = None
    peak_tflops: float = PEAK_TFLOPS
    sparse: str | None = None

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        return to_dtype(self.dtype, "--dtype")


def parse_shape(name: str) -> Grid:
    """A named shape or a latent grid written TxHxW."""
    if name in SHAPES:
        return SHAPES[name]
    try:
        t, h, w = (int(v) for v in name.split("x"))
    except ValueError:
        raise ValueError(f"shape {name!r} is neither one of {', '.join(SHAPES)} nor a latent grid TxHxW") from None
    return t, h, w


def parse_shapes(names: str) -> dict[str, Grid]:
    """Comma-separated shapes -> {name: latent grid}."""
    return {s: parse_shape(s) for s in names.split(",")}


def make_inputs(cfg, grid: Grid, device, dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """One sample's random network inputs for `grid`: latents, control latents, text, an MSE target,
    t = 0.5 and the diffusers peer's condition and padding masks."""
    g = torch.Generator(device=device).manual_seed(seed)
    T, H, W = grid
    C = cfg.dit.latent_channels

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, dtype=dtype, generator=g)

    return dict(
        x=r(1, C, T, H, W),
        ctrl=r(1, C, T, H, W),
        text=r(1, TEXT_TOKENS, cfg.dit.text_dim),
        target=r(1, C, T, H, W),
        t=torch.full((1,), 0.5, device=device, dtype=dtype),
        cond_mask=torch.zeros(1, 1, T, H, W, device=device, dtype=dtype),
        pad=torch.zeros(1, 1, H * 8, W * 8, device=device, dtype=dtype),
    )


def stage_batch(cfg, grid: Grid, device, dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """make_inputs as a training stage's batch: precomputed latents, control latents and text
    embeddings with their mask."""
    x = make_inputs(cfg, grid, device, dtype, seed)
    return {
        "latent": x["x"],
        "control_latent": x["ctrl"],
        "text_emb": x["text"],
        "text_mask": torch.ones(1, TEXT_TOKENS, dtype=torch.bool, device=device),
    }


def timed(fn: Callable[[], None], steps: int, device: torch.device, warmup: Callable[[], None] | None = None) -> float:
    """Median seconds of `steps` runs of fn after one warm-up run (of `warmup` if given: a cheaper
    call that builds the same kernels, for measurements too long to run twice)."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

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


def timed_peak(fn: Callable[[], None], steps: int, device: torch.device) -> tuple[float, float | None]:
    """timed(fn) and the peak memory (GiB, None off CUDA) of its runs, warm-up included."""
    reset_peak(device)
    seconds = timed(fn, steps, device)
    return seconds, peak_gib(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def out_of_memory(error: torch.OutOfMemoryError) -> str:
    """A row's `error` for a measurement that ran out of GPU memory (the message's first sentence)."""
    return "out of memory: " + str(error).split(".")[0]


def sig(x: float) -> float:
    # 4 significant digits: CPU smoke runs take milliseconds, which 3 decimals would round to 0
    return float(f"{x:.4g}")


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
    sparse: str = "none"
    """Sparse self-attention (`parse_sparse`): none, tiles:TILE:WINDOW or topk:TILE:KEEP."""

    def label(self) -> str:
        label = f"ckpt={self.checkpointing} attn={self.attention_backend} compile={int(self.compile)}"
        return label + (f" sparse={self.sparse}" if self.sparse != "none" else "")


def parse_sparse(text: str | None) -> SparseAttention | None:
    """`none` (dense), `tiles:TxHxW:WTxWHxWW` (tile size and window in tiles) or `topk:TxHxW:K`
    (tile size and key tiles kept) -> the network's sparse attention config."""
    if text in (None, "", "none"):
        return None
    parts = text.split(":")

    def grid(value: str) -> tuple[int, int, int]:
        return tuple(int(v) for v in value.split("x"))

    try:
        if len(parts) == 3 and parts[0] == "tiles":
            return SparseAttention("tiles", grid(parts[1]), window=grid(parts[2]))
        if len(parts) == 3 and parts[0] == "topk":
            return SparseAttention("topk", grid(parts[1]), keep=int(parts[2]))
    except ValueError as e:
        raise ValueError(f"sparse {text!r}: {e}") from None
    raise ValueError(f"sparse {text!r} is none, tiles:TxHxW:WTxWHxWW or topk:TxHxW:K (e.g. topk:4x4x8:110)")


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


def plan_variants(opts: Options, infer: bool) -> list[Variant]:
    """The configurations of ours to measure: the options' own, then `opts.variants`. A bad
    checkpointing mode, attention backend or shape is refused here, before minutes of measuring."""
    base = Variant(
        checkpointing=opts.checkpointing, compile=opts.compile, attention_backend=opts.attention_backend, infer=infer
    )
    runs = [base] + parse_variants(opts.variants, base)
    for v in runs:
        checkpoint_plan(v.checkpointing, 1)
        set_backend(v.attention_backend)
        parse_shapes(v.shapes or opts.shapes)
        parse_sparse(v.sparse)
    return runs


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"


def header(mode: str | None, device: torch.device, **fields) -> dict:
    """The first JSON line of a run: the command, the mode, versions and the device, then `fields`."""
    head: dict = dict(command="vidistill " + " ".join(sys.argv[1:]))
    if mode is not None:
        head["mode"] = mode
    head.update(torch=torch.__version__, python=platform.python_version(), device=device_name(device))
    return head | fields


def profile_table(step: Callable[[], None], device: torch.device, top: int) -> str:
    """One run of `step` under torch.profiler: its `top` kernels/ops by self device time (CPU time off CUDA)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=top, max_name_column_width=70)
