"""Inference pipeline: Transfer2.5-style specs (modules/spec.py) -> videos, on the Sampler.

One spec runs in phases, each on the component it needs, so offloading and two-GPU placement can
move components between phases:

    inputs   decode the input and control videos, resize, compute edge / blur, masks   (CPU)
    text     prompt and negative prompt embeddings                                     (text encoder)
    encode   control latents per chunk                                                 (tokenizer)
    denoise  chunk after chunk, each conditioned on the end of the one before           (DiT)
    decode   latents -> pixels                                                         (tokenizer)

Long videos are cut into chunks of `num_video_frames_per_chunk` frames that overlap by the pixel
frames of `num_conditional_frames` latent frames. The next chunk's conditioning latents come either
from re-encoding the decoded end of the previous chunk (what Cosmos does) or, with
`reuse_latents`, from the previous chunk's last latent frames directly (no decode/encode round
trip; for a causal VAE these are not the same numbers, and the quality effect is unmeasured).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np
import torch

from datamodules.codec import decode_video, resize_crop
from datamodules.controls import CONTROL_INTERPOLATION, blur, edge, mask_video
from datamodules.seeds import mix_seed

from .denoiser import Cond, Denoiser
from .sampling import DEFAULT_FPS, GenerationSettings, Sampler, SamplerConfig, to_uint8, to_unit
from .spec import MODALITY_NAMES, Spec

# Transfer2.5's generation sizes (height, width) per resolution and aspect ratio
BUCKETS = {
    "480": {(16, 9): (480, 832), (4, 3): (480, 640), (1, 1): (480, 480), (3, 4): (640, 480), (9, 16): (832, 480)},
    "720": {(16, 9): (704, 1280), (4, 3): (704, 960), (1, 1): (704, 704), (3, 4): (960, 704), (9, 16): (1280, 704)},
}


def spec_sampler(settings: GenerationSettings, spec: Spec) -> SamplerConfig:
    """The sampler a spec runs with. A teacher takes the spec's num_steps and guidance; a distilled
    student (no CFG) keeps its t-list when num_steps is its length or the spec default
    (`Spec.num_steps`, Transfer2.5's 35: a spec written for the teacher), and otherwise takes
    num_steps evenly spaced times from 1 (1 step: t = 1 only)."""
    base = settings.sampler_config()
    if base.sampler != "student":
        return replace(base, steps=spec.num_steps, guidance=spec.guidance)
    n = spec.num_steps
    if n == len(base.t_list):
        return base
    if n == Spec.num_steps:
        # the warnings registry shows this once per run, however many specs ask for the default
        warnings.warn(
            f"the student was distilled for {len(base.t_list)} steps; num_steps {n} (the Transfer2.5 "
            f"default) runs its {len(base.t_list)}-step t-list; pass --num-steps N for N evenly spaced steps",
            stacklevel=2,
        )
        return base
    return replace(base, t_list=tuple(1.0 - i / n for i in range(n)))


def nfe(sampler: SamplerConfig) -> int:
    """Network evaluations per chunk (CFG doubles a teacher step)."""
    if sampler.sampler == "student":
        return len(sampler.t_list)
    return sampler.steps * (2 if sampler.guidance else 1)


# --- inputs -----------------------------------------------------------------------------------------


@dataclass
class Inputs:
    """A spec's pixels at generation size: what the phases after `inputs` work on."""

    frames: int
    height: int
    width: int
    fps: float
    video: np.ndarray | None
    """(T, H, W, 3) uint8 input video at generation size, or None (text2world)."""
    controls: dict[str, np.ndarray] = field(default_factory=dict)
    """Per network modality (edge, blur, ...): (T, H, W, 3) uint8 control video."""
    weights: dict[str, float | np.ndarray] = field(default_factory=dict)
    """Per modality: control_weight, or control_weight x mask as (T, H, W) float32."""
    source_size: tuple[int, int] | None = None
    """The input video's own (height, width), for keep_input_resolution."""


def generation_size(resolution: str, height: int | None, width: int | None) -> tuple[int, int]:
    """(H, W) to generate at: Transfer2.5's bucket of the nearest aspect ratio for "480" / "720",
    or an explicit "HxW" (small models)."""
    if "x" in resolution:
        h, w = (int(v) for v in resolution.split("x"))
        return h, w
    buckets = BUCKETS[resolution]
    if not height or not width:
        return buckets[(16, 9)]
    aspect = width / height
    key = min(buckets, key=lambda r: abs(math.log(aspect * r[1] / r[0])))
    return buckets[key]


def _read(path: Path) -> tuple[np.ndarray, float]:
    return decode_video(path.read_bytes())


def load_inputs(spec: Spec, default_fps: float = DEFAULT_FPS, annotators: dict | None = None) -> Inputs:
    """Decode, cut to max_frames and resize the spec's videos; compute controls without a
    control_path from the input video (edge, vis, or `annotators[key](video)` -> (T, H, W, 3)
    uint8 for depth / seg / keypoint models plugged in by the user); masks times weights."""
    annotators = annotators or {}
    video, fps, source = None, default_fps, None
    if spec.video_path is not None:
        video, fps = _read(spec.video_path)
        fps = fps or default_fps
        source = video.shape[1:3]
        if spec.max_frames:
            video = video[: spec.max_frames]
    raw = {}
    for key, c in spec.controls.items():
        if c.control_path is not None:
            raw[key] = _read(c.control_path)[0]
    if video is not None:
        frames = len(video)
    elif raw:
        frames = min(len(v) for v in raw.values())
        frames = min(frames, spec.max_frames) if spec.max_frames else frames
        source = next(iter(raw.values())).shape[1:3]
    else:
        frames = spec.max_frames or spec.num_video_frames_per_chunk
    height, width = generation_size(spec.resolution, *(source or (None, None)))
    if video is not None:
        video = resize_crop(video, height, width)
    inputs = Inputs(frames, height, width, fps, video, source_size=tuple(source) if source is not None else None)
    for key, c in spec.controls.items():
        m = MODALITY_NAMES[key]
        if key in raw:
            if len(raw[key]) < frames:
                raise ValueError(
                    f"spec {spec.name!r}: {key}.control_path has {len(raw[key])} frames, the video needs {frames}"
                )
            ctrl = resize_crop(raw[key][:frames], height, width, CONTROL_INTERPOLATION.get(m, cv2.INTER_AREA))
        elif key in annotators:
            ctrl = np.asarray(annotators[key](video), dtype=np.uint8)
            if ctrl.shape != video.shape:
                raise ValueError(
                    f"spec {spec.name!r}: the {key} annotator returned shape {ctrl.shape}, expected {video.shape}"
                )
        elif key == "edge":
            ctrl = edge(video, c.preset_edge_threshold)
        elif key == "vis":  # the spec parser checked there is an input video
            ctrl = blur(video, c.preset_blur_strength)
        else:
            raise ValueError(f"spec {spec.name!r}: no {key}.control_path and no {key} annotator")
        inputs.controls[m] = ctrl
        w: float | np.ndarray = float(c.control_weight)
        if c.mask_path is not None:
            mask_frames = _read(c.mask_path)[0]
            if len(mask_frames) < frames:
                raise ValueError(
                    f"spec {spec.name!r}: {key}.mask_path has {len(mask_frames)} frames, the video needs {frames}"
                )
            w = mask_video(mask_frames[:frames], None, height, width) * float(c.control_weight)
        inputs.weights[m] = w
    return inputs


# --- chunks -----------------------------------------------------------------------------------------


def valid_frames(tokenizer, n: int) -> int:
    """The smallest frame count >= n the tokenizer accepts."""
    f = tokenizer.temporal_factor
    if tokenizer.causal:
        return 1 + f * math.ceil(max(n - 1, 0) / f)
    return f * math.ceil(n / f)


def chunk_starts(total: int, chunk: int, overlap: int) -> list[int]:
    """First frame of every chunk: chunk k starts `overlap` frames before chunk k-1 ends."""
    if total <= chunk:
        return [0]
    if overlap >= chunk:
        raise ValueError(f"the chunk overlap ({overlap} frames) must be shorter than a chunk ({chunk})")
    step = chunk - overlap
    return [0] + [s for s in range(step, total - overlap, step)]


def _pad(x: np.ndarray, n: int) -> np.ndarray:
    """Repeat the last frame up to n frames (the last chunk of a long video)."""
    return x if len(x) >= n else np.concatenate([x, np.repeat(x[-1:], n - len(x), axis=0)])


def _tensor(video: np.ndarray, device) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (1, 3, T, H, W) in [-1, 1]."""
    return to_unit(torch.from_numpy(np.ascontiguousarray(video)).permute(3, 0, 1, 2)[None].to(device))


@dataclass
class Plan:
    """How a spec's frames are cut: generation runs chunks of `chunk` frames (a count the tokenizer
    accepts) overlapping by `overlap` frames = `cond_latents` latent frames."""

    chunk: int
    overlap: int
    cond_latents: int
    starts: list[int]
    lead: np.ndarray | None = None
    """video2world: the input frames the first chunk continues from."""


def plan(spec: Spec, inputs: Inputs, tokenizer, mode: str) -> Plan:
    """Chunks of a spec. video2world generates one chunk that starts with the input video's last
    frames (the pixel frames of num_conditional_frames latent frames) and continues them."""
    n_cond = spec.num_conditional_frames
    overlap = tokenizer.num_frames(n_cond) if n_cond else 0
    if mode == "video2world":
        if not n_cond:
            raise ValueError(f"spec {spec.name!r}: video2world continues from num_conditional_frames >= 1 frames")
        if inputs.video is None or len(inputs.video) < overlap:
            raise ValueError(f"spec {spec.name!r}: video2world needs an input video of at least {overlap} frames")
        chunk = valid_frames(tokenizer, max(spec.num_video_frames_per_chunk, overlap + 1))
        return Plan(chunk, overlap, n_cond, [0], inputs.video[-overlap:])
    chunk = valid_frames(tokenizer, min(spec.num_video_frames_per_chunk, max(inputs.frames, overlap + 1)))
    lead = None
    starts = chunk_starts(inputs.frames, chunk, overlap)
    if len(starts) > 1 and not n_cond:
        raise ValueError(
            f"spec {spec.name!r}: {inputs.frames} frames need {len(starts)} chunks, which are "
            "chained through num_conditional_frames >= 1"
        )
    return Plan(chunk, overlap, n_cond, starts, lead)


# --- the generation of one spec ----------------------------------------------------------------------


@dataclass
class Prepared:
    """A spec after the text and encode phases: everything the DiT phase needs."""

    spec: Spec
    inputs: Inputs
    plan: Plan
    sampler: SamplerConfig
    text: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
    controls: list[dict[str, torch.Tensor]]
    """Per chunk: control latents per modality."""
    weights: list[dict[str, float | torch.Tensor]]
    lead: torch.Tensor | None = None
    latents: list[torch.Tensor] = field(default_factory=list)
    pixels: dict[int, np.ndarray] = field(default_factory=dict)
    """Chunks the round trip already decoded (the decode phase does not decode them again)."""
    video: np.ndarray | None = None
    seconds: dict[str, float] = field(default_factory=dict)


class Pipeline:
    """A Sampler plus where its parts live; runs the phases of a spec.

    `devices` maps component (text_encoder, tokenizer, dit) to the device it computes on;
    components in `offload` wait on the CPU and visit their device only during their phase."""

    def __init__(
        self,
        sampler: Sampler,
        settings: GenerationSettings,
        devices: dict[str, torch.device],
        offload: tuple[str, ...] = (),
        reuse_latents: bool = False,
        mode: str = "transfer",
        dtype: torch.dtype = torch.float32,
        progress: bool = False,
        annotators: dict | None = None,
    ):
        if sampler.tokenizer is None or sampler.text_encoder is None:
            raise ValueError("inference needs a tokenizer and a text encoder (generation.json or the infer flags)")
        self.sampler, self.settings, self.devices, self.offload = sampler, settings, devices, set(offload)
        self.reuse_latents, self.mode, self.dtype, self.progress = reuse_latents, mode, dtype, progress
        self.annotators = annotators or {}
        for name, module in self._components().items():
            module.to("cpu" if name in self.offload else devices[name])

    def _components(self) -> dict[str, torch.nn.Module]:
        return {
            "text_encoder": self.sampler.text_encoder,
            "tokenizer": self.sampler.tokenizer,
            "dit": self.sampler.denoiser,
        }

    def _enter(self, name: str) -> torch.device:
        if name in self.offload:
            self._components()[name].to(self.devices[name])
        return self.devices[name]

    def _leave(self, name: str) -> None:
        if name in self.offload:
            self._components()[name].to("cpu")
            if self.devices[name].type == "cuda":
                torch.cuda.empty_cache()

    # phases ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def prepare(self, spec: Spec) -> Prepared:
        """inputs + text + encode."""
        t0 = time.perf_counter()
        inputs = load_inputs(spec, self.settings.fps, self.annotators)
        tok = self.sampler.tokenizer
        p = plan(spec, inputs, tok, self.mode)
        sampler = spec_sampler(self.settings, spec)
        t1 = time.perf_counter()
        dev = self._enter("text_encoder")
        emb, mask = self.sampler.text_encoder.encode([spec.prompt, spec.negative_prompt])
        emb, mask = emb.to(dev), mask.to(dev)
        self._leave("text_encoder")
        text = (emb[:1], mask[:1], emb[1:], mask[1:])
        t2 = time.perf_counter()
        dev = self._enter("tokenizer")
        controls, weights = [], []
        for s in p.starts:
            controls.append(
                {m: tok.encode(_tensor(_pad(v[s : s + p.chunk], p.chunk), dev)) for m, v in inputs.controls.items()}
            )
            weights.append(
                {
                    m: (w if isinstance(w, float) else torch.from_numpy(_pad(w[s : s + p.chunk], p.chunk))[None, None])
                    for m, w in inputs.weights.items()
                }
            )
        lead = None
        if p.lead is not None:
            lead = tok.encode(_tensor(p.lead, dev))
        self._leave("tokenizer")
        t3 = time.perf_counter()
        return Prepared(
            spec,
            inputs,
            p,
            sampler,
            text,
            controls,
            weights,
            lead,
            seconds={"inputs": t1 - t0, "text": t2 - t1, "encode": t3 - t2},
        )

    @torch.no_grad()
    def denoise(self, job: Prepared) -> Prepared:
        """The DiT phase: every chunk, each conditioned on the end of the previous one."""
        t0 = time.perf_counter()
        dev = self._enter("dit")
        tok, p = self.sampler.tokenizer, job.plan
        C, T, H, W = tok.latent_shape(p.chunk, job.inputs.height, job.inputs.width)
        text = [x.to(dev) for x in job.text]
        previous = job.lead
        for k in range(len(p.starts)):
            frames = torch.zeros(1, T, device=dev)
            cond_latents = None
            if previous is not None:
                frames[:, : p.cond_latents] = 1
                cond_latents = torch.zeros(1, C, T, H, W, device=dev)
                cond_latents[:, :, : p.cond_latents] = previous[:, :, -p.cond_latents :].to(dev)
            cond = Cond(
                text=text[0],
                text_mask=text[1],
                neg_text=text[2],
                neg_text_mask=text[3],
                controls={m: v.to(dev) for m, v in job.controls[k].items()},
                control_weights={m: (w.to(dev) if torch.is_tensor(w) else w) for m, w in job.weights[k].items()},
                cond_latents=cond_latents,
                cond_frames=None if cond_latents is None else frames,
                fps=job.inputs.fps,
            )
            # chunk k's noise: seed * 1000 + k, the stream chunks have always drawn from
            gen = torch.Generator(device=dev).manual_seed(mix_seed(job.spec.seed, k, strides=(1000,)))
            noise = torch.randn(1, C, T, H, W, generator=gen, device=dev)
            # states stay fp32 across steps; a bf16 network computes under autocast
            with torch.autocast(dev.type, self.dtype, enabled=self.dtype != torch.float32):
                x0 = self.sampler.sample(cond, noise, job.sampler, generator=gen, progress=self.progress)
            x0 = x0.float()
            job.latents.append(x0.cpu())
            if k + 1 < len(p.starts):
                previous = x0 if self.reuse_latents else self._round_trip(job, k, x0)
        self._leave("dit")
        job.seconds["denoise"] = time.perf_counter() - t0
        return job

    @torch.no_grad()
    def _round_trip(self, job: Prepared, k: int, x0: torch.Tensor) -> torch.Tensor:
        """Conditioning latents for chunk k + 1 as Cosmos makes them: decode chunk k, take its last
        `overlap` frames, encode them. The decoded chunk is kept for the output."""
        dev = self._enter("tokenizer")
        pixels = self.sampler.tokenizer.decode(x0.to(dev))
        z = self.sampler.tokenizer.encode(pixels[:, :, -job.plan.overlap :])
        self._leave("tokenizer")
        job.pixels[k] = to_uint8(pixels)[0].permute(1, 2, 3, 0).cpu().numpy()
        return z

    @torch.no_grad()
    def decode(self, job: Prepared) -> Prepared:
        """Latents -> (frames, H, W, 3) uint8: the first chunk whole, later ones without the overlap."""
        t0 = time.perf_counter()
        dev = self._enter("tokenizer")
        parts = []
        for k, z in enumerate(job.latents):
            v = (
                job.pixels.pop(k)
                if k in job.pixels
                else to_uint8(self.sampler.tokenizer.decode(z.to(dev)))[0].permute(1, 2, 3, 0).cpu().numpy()
            )
            parts.append(v if k == 0 else v[job.plan.overlap :])
        self._leave("tokenizer")
        video = np.concatenate(parts)
        job.video = video if self.mode == "video2world" else video[: job.inputs.frames]
        job.latents = []
        job.seconds["decode"] = time.perf_counter() - t0
        return job

    def run(self, spec: Spec) -> Prepared:
        return self.decode(self.denoise(self.prepare(spec)))


def build_sampler(model: str | Path, settings: GenerationSettings, device="cpu", dtype=torch.float32) -> Sampler:
    """A Sampler from a Denoiser directory and the settings' tokenizer and text encoder."""
    from .text import build_text_encoder
    from .tokenizer import build_tokenizer

    denoiser = Denoiser.from_pretrained(model, device=device, dtype=dtype).eval()
    tok = settings.tokenizer
    tokenizer = build_tokenizer(tok["kind"], tok.get("path"), **(tok.get("options") or {}))
    text = build_text_encoder(settings.text["encoder"], int(settings.text["max_length"]))
    if tokenizer.latent_channels != denoiser.cfg.dit.latent_channels:
        raise ValueError(
            f"{model} takes {denoiser.cfg.dit.latent_channels}-channel latents, the tokenizer "
            f"{tok['kind']} gives {tokenizer.latent_channels}"
        )
    return Sampler(denoiser, tokenizer, text)


# --- two-device placement ------------------------------------------------------------------------------


def placement_slots(n: int) -> list[tuple[list[tuple[str, int]], list[tuple[str, int]]]]:
    """The software pipeline of `n` specs over two devices, as time slots (side A, side B).

    Side A holds the text encoder and tokenizer, side B the DiT. In slot t, B denoises spec t-1
    while A decodes spec t-2 and then prepares (text + control latents) spec t; every slot ends
    when both sides are done. n specs take n + 2 slots."""
    slots = []
    for t in range(n + 2):
        a = ([("decode", t - 2)] if 0 <= t - 2 < n else []) + ([("prepare", t)] if t < n else [])
        b = [("denoise", t - 1)] if 0 <= t - 1 < n else []
        slots.append((a, b))
    return slots


def run_placed(pipeline: Pipeline, specs: list[Spec], finish, fail) -> list[tuple[str, int]]:
    """Run specs through `placement_slots` with one thread per side (GPU kernels release the GIL,
    so both devices compute at once). `finish(job)` gets each decoded spec on side A, in order;
    `fail(spec, error)` a spec whose phase raised (its later phases are skipped). Returns the
    phases in the order they started."""
    import threading

    jobs: dict[int, Prepared] = {}
    started: list[tuple[str, int]] = []
    lock = threading.Lock()

    def side(tasks):
        for phase, i in tasks:
            if phase != "prepare" and i not in jobs:
                continue  # an earlier phase of this spec failed
            with lock:
                started.append((phase, i))
            try:
                if phase == "prepare":
                    jobs[i] = pipeline.prepare(specs[i])
                elif phase == "denoise":
                    pipeline.denoise(jobs[i])
                else:
                    finish(pipeline.decode(jobs.pop(i)))
            except Exception as err:  # noqa: BLE001 - reported per spec, the batch goes on
                jobs.pop(i, None)
                fail(specs[i], err)

    for a, b in placement_slots(len(specs)):
        threads = [threading.Thread(target=side, args=(tasks,)) for tasks in (a, b) if tasks]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    return started
