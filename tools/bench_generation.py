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
import json
import math
import platform
import sys
from collections.abc import Callable

import torch

from modules.denoiser import Cond, Denoiser
from modules.nets import preset as net_preset
from modules.nets import set_backend
from modules.sampling import Sampler, SamplerConfig
from modules.tokenizer import WanTokenizer, build_tokenizer
from tools.bench import TEXT_TOKENS, parse_shape, peak_gib, reset_peak, timed

DECODERS = ("wan2.1", "pixel", "none")
Decoder = tuple[Callable[[torch.Tensor], torch.Tensor] | None, int | None, int, int]


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


def _sig(x: float) -> float:
    # 4 significant digits: CPU smoke runs take milliseconds, which 3 decimals would round to 0
    return float(f"{x:.4g}")


def bench_generation(
    preset: str = "2b",
    shapes: str = "480p_93f",
    steps: int = 1,
    device: str = "cuda",
    dtype: str = "bfloat16",
    teacher_steps: int = 35,
    guidance: float = 3.0,
    student_steps: int = 4,
    decode: str = "wan2.1",
    modalities: str = "edge",
    attention_backend: str = "auto",
    compile: bool = False,
    decode_channels_last: bool = False,
    decode_compile: bool = False,
) -> list[dict]:
    """Time teacher and student sampling (+ decoding) per shape; print JSON rows and a table; return
    the rows. `compile`: torch.compile each block (inductor), as `sharding.compile` in training.
    `decode_channels_last`, `decode_compile`: WanTokenizer's `channels_last` and `compile`."""
    if decode not in DECODERS:
        raise ValueError(f"unknown decode {decode!r}; choose one of {', '.join(DECODERS)}")
    if teacher_steps < 1 or student_steps < 1 or steps < 1:
        raise ValueError("teacher_steps, student_steps and steps must be >= 1")
    dev = torch.device(device)
    dt = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    decode_fn, channels, tf, sf = make_decoder(decode, dev, dt, decode_channels_last, decode_compile)
    overrides = {"latent_channels": channels} if channels else {}
    cfg = net_preset(preset, text_proj_in=None, **overrides)
    cfg.modalities = [m for m in modalities.split(",") if m]
    set_backend(attention_backend)
    model = Denoiser.build(cfg, device=dev, dtype=dt)
    from modules.parallel import set_compile

    set_compile(model, compile)
    gen = Sampler(model).eval()
    samplers = {
        "teacher": SamplerConfig(sampler="euler", steps=teacher_steps, guidance=guidance),
        # steps and guidance are unused by the student sampler; set so the header reads true
        "student": SamplerConfig(
            sampler="student",
            steps=student_steps,
            guidance=0.0,
            t_list=tuple(1 - i / student_steps for i in range(student_steps)),
        ),
    }
    nfe = {"teacher": teacher_steps * (2 if guidance else 1), "student": student_steps}
    header = dict(
        command="vidistill " + " ".join(sys.argv[1:]),
        mode="generation",
        torch=torch.__version__,
        python=platform.python_version(),
        device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        preset=preset,
        dtype=dtype,
        modalities=cfg.modalities,
        decode=decode,
        compile=compile,
        decode_channels_last=decode_channels_last,
        decode_compile=decode_compile,
        attention_backend=attention_backend,
        samplers={k: dataclasses.asdict(v) for k, v in samplers.items()},
        config=dataclasses.asdict(cfg.dit),
        control=dataclasses.asdict(cfg.control),
    )
    print(json.dumps(header), flush=True)

    rows = []
    for shape in shapes.split(","):
        T, H, W = parse_shape(shape)
        g = torch.Generator(device=dev).manual_seed(0)
        r = lambda *s: torch.randn(*s, device=dev, dtype=dt, generator=g)
        noise = r(1, cfg.dit.latent_channels, T, H, W)
        cond = Cond(
            text=r(1, TEXT_TOKENS, cfg.dit.text_dim),
            neg_text=r(1, TEXT_TOKENS, cfg.dit.text_dim),
            controls={m: r(1, cfg.dit.latent_channels, T, H, W) for m in cfg.modalities},
        )
        video = f"{1 + tf * (T - 1)}x{H * sf}x{W * sf}" if decode_fn else None
        for impl, sampler in samplers.items():
            out = {}

            def denoise():
                out["x0"] = gen.sample(cond, noise, sampler, generator=g)

            one_step = dataclasses.replace(sampler, steps=1, t_list=sampler.t_list[:1])
            reset_peak(dev)
            denoise_s = timed(denoise, steps, dev, warmup=lambda: gen.sample(cond, noise, one_step, generator=g))
            with torch.no_grad():
                # a compiled decoder settles over two whole decodes (static shapes, then dynamic ones)
                warm = lambda: [decode_fn(out["x0"]) for _ in range(1 + decode_compile)]  # noqa: E731
                decode_s = timed(lambda: decode_fn(out["x0"]), steps, dev, warmup=warm) if decode_fn else 0.0
            mem = peak_gib(dev)
            rows.append(
                dict(
                    shape=shape,
                    impl=impl,
                    video=video,
                    nfe=nfe[impl],
                    denoise_s=_sig(denoise_s),
                    decode_s=_sig(decode_s),
                    total_s=_sig(denoise_s + decode_s),
                    s_per_nfe=_sig(denoise_s / nfe[impl]),
                    peak_GiB=mem and round(mem, 1),
                )
            )
            print(json.dumps(rows[-1]), flush=True)
    print(format_table(rows))
    return rows


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
        ratio = lambda k: t[k] / s[k] if s[k] > 0 else math.inf
        lines.append(
            f"{shape}: speed-up student vs teacher: denoise {ratio('denoise_s'):.2f}x, "
            f"end to end {ratio('total_s'):.2f}x"
        )
    return "\n".join(lines)
