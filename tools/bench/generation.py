"""`vidistill bench --mode generation`: end-to-end sampling time of the teacher against the student.

One randomly initialised Denoiser of a preset (weights do not change the time) samples each latent
grid twice through `Sampler.sample`: as the teacher (Euler, `teacher_steps` steps, Cosmos CFG:
two network calls per step) and as the distilled student (`student_steps` calls on a fixed t-list,
no CFG). Text embeddings and control latents are given as random tensors, as if precomputed and
encoded; the final latents are then decoded by a randomly initialised full-size Wan2.1 VAE
(`--decode wan2.1`), the pixel tokenizer (`pixel`, for CPU smoke tests) or not at all (`none`).
Times are medians over `steps` runs; end to end = denoise + decode. The warm-up before them is
one sampling step of the same sampler (the same network calls and kernels), not a whole run (a
35-step CFG teacher at 720p runs for minutes), and one whole decode (two with `decode_compile`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Callable

import torch

from modules.denoiser import Cond, Denoiser
from modules.nets import NetConfig, set_backend
from modules.nets import preset as net_preset
from modules.nets.dit import set_sparse
from modules.parallel import set_compile
from modules.sampling import Sampler, SamplerConfig
from modules.tokenizer import WanTokenizer, build_tokenizer
from tools.bench.common import (
    TEXT_TOKENS,
    Options,
    header,
    parse_shape,
    parse_sparse,
    peak_gib,
    reset_peak,
    sig,
    timed,
)

DECODERS = ("wan2.1", "pixel", "none")
Decoder = tuple[Callable[[torch.Tensor], torch.Tensor] | None, int | None, int, int]


@dataclasses.dataclass(frozen=True)
class GenerationOptions:
    """`--mode generation`'s own options; each field is `vidistill bench`'s flag of the same name."""

    teacher_steps: int = 35
    guidance: float = 3.0
    student_steps: int = 4
    decode: str = "wan2.1"
    modalities: str = "edge"
    decode_channels_last: bool = False
    decode_compile: bool = False


def make_decoder(
    kind: str, device: torch.device, dtype: torch.dtype, channels_last: bool = False, compile: bool = False
) -> Decoder:
    """(decode, latent_channels, temporal_factor, spatial_factor); decode and channels None for `none`.
    `channels_last` and `compile` are WanTokenizer's options of the same names (wan2.1 only)."""
    if kind == "none":
        return None, None, 1, 1
    if kind == "pixel":
        tok = build_tokenizer("pixel", spatial=2)
        return tok.decode, tok.latent_channels, tok.temporal_factor, tok.spatial_factor
    if kind != "wan2.1":
        raise ValueError(f"unknown decode {kind!r}; choose one of {', '.join(DECODERS)}")
    try:
        from diffusers import AutoencoderKLWan
    except ImportError as e:
        raise ImportError('--decode wan2.1 needs diffusers: pip install -e ".[wan]"') from e
    # the default config *is* the full-size Wan2.1 VAE, and random weights decode in the same time;
    # decoding goes through WanTokenizer, as `vidistill infer` decodes
    tok = WanTokenizer(vae=AutoencoderKLWan().to(device, dtype), channels_last=channels_last, compile=compile)
    return tok.to(device).decode, tok.latent_channels, tok.temporal_factor, tok.spatial_factor


def bench_generation(opts: Options, gen: GenerationOptions) -> list[dict]:
    """Time teacher and student sampling (+ decoding) per shape; print JSON rows and a table; return
    the rows. `opts.compile`: torch.compile each block (inductor), as `sharding.compile` in
    training. `gen.decode_channels_last`, `gen.decode_compile`: WanTokenizer's `channels_last` and
    `compile`."""
    if gen.decode not in DECODERS:
        raise ValueError(f"unknown decode {gen.decode!r}; choose one of {', '.join(DECODERS)}")
    if gen.teacher_steps < 1 or gen.student_steps < 1 or opts.steps < 1:
        raise ValueError("teacher_steps, student_steps and steps must be >= 1")
    parse_sparse(opts.sparse)  # refused before minutes of teacher sampling
    dev, dt = opts.torch_device, opts.torch_dtype
    decoder = make_decoder(gen.decode, dev, dt, gen.decode_channels_last, gen.decode_compile)
    sampler, cfg = build_sampler(opts, gen, decoder, dev, dt)
    configs = sampler_configs(gen)
    print(json.dumps(generation_header(opts, gen, cfg, configs, dev)), flush=True)
    rows = []
    for shape in opts.shapes.split(","):
        rows += measure_shape(sampler, cfg, configs, decoder, shape, gen, opts.steps, dev, dt, opts.sparse)
    print(format_table(rows))
    return rows


def build_sampler(
    opts: Options, gen: GenerationOptions, decoder: Decoder, dev: torch.device, dt: torch.dtype
) -> tuple[Sampler, NetConfig]:
    """A randomly initialised Denoiser of the preset, with the decoder's latent channels and a
    control branch per modality, in a Sampler; and its config."""
    channels = decoder[1]
    overrides = {"latent_channels": channels} if channels else {}
    cfg = net_preset(opts.preset, text_proj_in=None, **overrides)
    cfg.modalities = [m for m in gen.modalities.split(",") if m]
    set_backend(opts.attention_backend)
    model = Denoiser.build(cfg, device=dev, dtype=dt)
    set_compile(model, opts.compile)
    return Sampler(model).eval(), cfg


def sampler_configs(gen: GenerationOptions) -> dict[str, SamplerConfig]:
    return {
        "teacher": SamplerConfig(sampler="euler", steps=gen.teacher_steps, guidance=gen.guidance),
        # steps and guidance are unused by the student sampler; set so the header reads true
        "student": SamplerConfig(
            sampler="student",
            steps=gen.student_steps,
            guidance=0.0,
            t_list=tuple(1 - i / gen.student_steps for i in range(gen.student_steps)),
        ),
    }


def network_calls(config: SamplerConfig) -> int:
    """Network calls of one sampling run (NFE): CFG doubles the teacher's."""
    if config.sampler == "student":
        return config.steps
    return config.steps * (2 if config.guidance else 1)


def generation_header(
    opts: Options, gen: GenerationOptions, cfg, configs: dict[str, SamplerConfig], dev: torch.device
) -> dict:
    return header(
        "generation",
        dev,
        preset=opts.preset,
        dtype=opts.dtype,
        modalities=cfg.modalities,
        decode=gen.decode,
        compile=opts.compile,
        decode_channels_last=gen.decode_channels_last,
        decode_compile=gen.decode_compile,
        attention_backend=opts.attention_backend,
        student_sparse=opts.sparse or "none",
        samplers={k: dataclasses.asdict(v) for k, v in configs.items()},
        config=dataclasses.asdict(cfg.dit),
        control=dataclasses.asdict(cfg.control),
    )


def measure_shape(
    sampler: Sampler,
    cfg,
    configs: dict[str, SamplerConfig],
    decoder: Decoder,
    shape: str,
    gen: GenerationOptions,
    steps: int,
    dev: torch.device,
    dt: torch.dtype,
    gen_sparse: str | None = None,
) -> list[dict]:
    """Teacher and student rows of one shape, sampling the same noise and conditioning; the
    student with `gen_sparse` attention (`parse_sparse`), the teacher dense."""
    decode_fn, _, tf, sf = decoder
    T, H, W = parse_shape(shape)
    g = torch.Generator(device=dev).manual_seed(0)

    def r(*size: int) -> torch.Tensor:
        return torch.randn(*size, device=dev, dtype=dt, generator=g)

    noise = r(1, cfg.dit.latent_channels, T, H, W)
    cond = Cond(
        text=r(1, TEXT_TOKENS, cfg.dit.text_dim),
        neg_text=r(1, TEXT_TOKENS, cfg.dit.text_dim),
        controls={m: r(1, cfg.dit.latent_channels, T, H, W) for m in cfg.modalities},
    )
    video = f"{1 + tf * (T - 1)}x{H * sf}x{W * sf}" if decode_fn else None
    rows = []
    for impl, config in configs.items():
        set_sparse(sampler.denoiser, parse_sparse(gen_sparse) if impl == "student" else None)
        run = functools.partial(sampler.sample, cond, noise, generator=g)
        denoise_s, decode_s, mem = measure_sampling(run, config, decode_fn, gen.decode_compile, steps, dev)
        nfe = network_calls(config)
        rows.append(
            dict(
                shape=shape,
                impl=impl,
                video=video,
                nfe=nfe,
                denoise_s=sig(denoise_s),
                decode_s=sig(decode_s),
                total_s=sig(denoise_s + decode_s),
                s_per_nfe=sig(denoise_s / nfe),
                peak_GiB=mem and round(mem, 1),
            )
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def measure_sampling(
    run: Callable[[SamplerConfig], torch.Tensor],
    config: SamplerConfig,
    decode_fn: Callable[[torch.Tensor], torch.Tensor] | None,
    decode_compile: bool,
    steps: int,
    dev: torch.device,
) -> tuple[float, float, float | None]:
    """Median denoise and decode seconds of one sampler and the peak GiB of both; `run(config)`
    samples. The denoise warm-up is one step of the same sampler."""
    out = {}

    def denoise() -> None:
        out["x0"] = run(config)

    def decode() -> None:
        decode_fn(out["x0"])

    def warm_decode() -> None:
        # a compiled decoder settles over two whole decodes (static shapes, then dynamic ones)
        for _ in range(1 + decode_compile):
            decode()

    one_step = dataclasses.replace(config, steps=1, t_list=config.t_list[:1])
    reset_peak(dev)
    denoise_s = timed(denoise, steps, dev, warmup=functools.partial(run, one_step))
    with torch.no_grad():
        decode_s = timed(decode, steps, dev, warmup=warm_decode) if decode_fn else 0.0
    return denoise_s, decode_s, peak_gib(dev)


def format_table(rows: list[dict]) -> str:
    """Markdown table plus, per shape, the student's speed-up (teacher time / student time)."""
    lines = [
        "| shape | impl | video | NFE | denoise s | decode s | total s | s/NFE | peak GiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['shape']} | {r['impl']} | {r['video']} | {r['nfe']} | {r['denoise_s']} | {r['decode_s']} "
        f"| {r['total_s']} | {r['s_per_nfe']} | {r['peak_GiB']} |"
        for r in rows
    ]
    lines.append("")
    by = {(r["shape"], r["impl"]): r for r in rows}
    for shape in dict.fromkeys(r["shape"] for r in rows):
        t, s = by[shape, "teacher"], by[shape, "student"]

        def ratio(key: str, t=t, s=s) -> float:
            return t[key] / s[key] if s[key] > 0 else math.inf

        lines.append(
            f"{shape}: speed-up student vs teacher: denoise {ratio('denoise_s'):.2f}x, "
            f"end to end {ratio('total_s'):.2f}x"
        )
    return "\n".join(lines)
