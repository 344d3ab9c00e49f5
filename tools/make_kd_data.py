"""`vidistill make-kd-data`: the teacher samples the dataset's prompts and controls and saves
what knowledge distillation needs, as shards the VideoDataModule reads with ``use_kd: true``.

Per sample (key = the source sample's key):

- ``kd.safetensors``: ``noise`` (C, T', H', W'), the teacher's input at t = 1; ``states``
  (K, C, T', H', W'), the teacher's sampler state at each time of the student's t-list;
  ``t`` (K,), those times (after the shift); ``x0``, the teacher's clean latent (t = 0); and
  ``control.<modality>`` (3, T, H, W) uint8, the exact control pixels the teacher saw.
- ``text.safetensors``: the text embeddings the teacher was conditioned on (``emb``, ``mask``).
- ``mp4`` the decoded teacher video, ``<modality>.mp4`` the control (both to look at: mp4v is
  lossy, the safetensors are exact), ``txt`` the caption and ``json`` the settings.

The teacher's grid passes exactly through the student's times (`flow.schedule_through`), so the
saved states are points of the very trajectory that produced ``x0``. Noise is drawn per sample
from (seed, key), so a sample's data do not depend on batch size, rank count or resuming.

Several processes (torchrun): rank r takes every r-th planned sample and writes its own shards to
``OUT/rank{r:03d}`` (one index.json per rank, resumable); one process writes to ``OUT``. The
datamodule reads either layout from ``OUT``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

__all__ = ["make_kd_data"]

_DTYPES = ("float32", "bfloat16", "float16")


def _noise(seed: int, key: str, shape: tuple[int, ...]):
    import torch

    digest = hashlib.sha256(f"vidistill-kd:{seed}:{key}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") % (2**63))
    return torch.randn(shape, generator=g)


def make_kd_data(
    *,
    teacher: str,
    shards: str,
    out: str,
    modality: str | None = "edge",
    num_samples: int | None = None,
    num_frames: int = 93,
    height: int = 480,
    width: int = 832,
    tokenizer: str = "pixel",
    tokenizer_path: str | None = None,
    tokenizer_options: dict[str, Any] | None = None,
    text_encoder: str = "tiny",
    max_length: int = 512,
    guidance: float = 3.0,
    negative_prompt: str | None = None,
    sampler: str = "euler",
    steps: int = 35,
    shift: float = 5.0,
    t_list: list[float] = (1.0, 0.75, 0.5, 0.25),
    t_shift: float = 5.0,
    batch_size: int = 1,
    samples_per_shard: int = 100,
    store_dtype: str = "float32",
    seed: int = 0,
    device: str = "auto",
    resume: bool = True,
    progress: bool = True,
) -> None:
    """Sample the teacher on a dataset and write KD shards (see the module doc for the format).

    Args:
        teacher: the teacher network directory (base + control branch; `combine` or a control
            stage's export).
        shards: the source shards (captions + videos; controls as the datamodule delivers them).
        out: output folder.
        modality: the control the teacher follows (edge, blur, ...); none for a plain base.
        num_samples: the first this many source samples (in shard order); none: all.
        num_frames: frames per clip (from frame 0).
        height: clip height.
        width: clip width.
        tokenizer: pixel, cosmos-jit or wan2.1 (the teacher's tokenizer).
        tokenizer_path: local weights of the tokenizer.
        tokenizer_options: tokenizer constructor options, e.g. {spatial: 2}.
        text_encoder: tiny, none (shards with text.safetensors) or a local model path.
        max_length: text tokens.
        guidance: CFG weight in Cosmos's form (pred = cond + g (cond - uncond)).
        negative_prompt: the unconditional prompt; none: the null text (zero embeddings) that
            training drops captions to.
        sampler: euler or dpmpp_2m.
        steps: teacher steps.
        shift: time shift of the teacher's grid.
        t_list: the student's times before `t_shift`; the states at these are saved.
        t_shift: shift of the student's t-list.
        batch_size: samples per teacher batch.
        samples_per_shard: samples per output shard.
        store_dtype: dtype of the saved latents and embeddings (float32, bfloat16, float16).
        seed: noise seed.
        device: auto (cuda:LOCAL_RANK when available, else cpu), cpu or cuda[:i].
        resume: keep shards a previous identical run finished.
        progress: show a progress bar.
    """
    import torch

    from datamodules.codec import encode_video
    from datamodules.sample import SAMPLE_ERRORS, SampleLoader, collate
    from datamodules.shards import expand_shards, iter_tar_samples
    from datamodules.writer import SkipSample, tar_keys, write_shards
    from modules import flow
    from modules.denoiser import Cond, Denoiser
    from modules.sampling import Sampler, SamplerConfig, to_uint8, to_unit
    from modules.text import build_text_encoder
    from modules.tokenizer import build_tokenizer

    if store_dtype not in _DTYPES:
        raise ValueError(f"store_dtype must be one of {_DTYPES}, got {store_dtype!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if device == "auto":
        device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    dtype = getattr(torch, store_dtype)

    net = Denoiser.from_pretrained(teacher, device=dev).eval().requires_grad_(False)
    if modality and modality not in net.controls:
        raise ValueError(f"{teacher} has no {modality} control branch (it has {sorted(net.controls)})")
    tok = build_tokenizer(tokenizer, tokenizer_path, **(tokenizer_options or {})).to(dev)
    if tok.latent_channels != net.cfg.dit.latent_channels:
        raise ValueError(
            f"{teacher} takes {net.cfg.dit.latent_channels}-channel latents, the tokenizer gives {tok.latent_channels}"
        )
    encoder = build_text_encoder(text_encoder, max_length)
    cfg = SamplerConfig(sampler=sampler, steps=steps, guidance=guidance, shift=shift)
    times = flow.student_t_list(t_list, t_shift)
    loader = SampleLoader(num_frames, height, width, 1, None, modality, "medium", encoder is None, False)

    urls = expand_shards(shards)
    keys = [k for url in urls for k in tar_keys(url)]
    keys = keys[:num_samples] if num_samples else keys
    mine = keys[rank::world]
    if not mine:
        raise ValueError(f"rank {rank} of {world} has no samples (the source holds {len(keys)})")
    target = Path(out) / f"rank{rank:03d}" if world > 1 else Path(out)
    # raw samples in shard order, consumed lazily as the plan (in the same order) asks for keys
    raws = (raw for url in urls for raw in iter_tar_samples(url))
    done: dict[str, list] = {}

    def run(batch_keys: list[str]) -> None:
        samples = []
        for key in batch_keys:
            raw = next(r for r in raws if r["__key__"] == key)  # plan order = shard order
            try:
                samples.append(loader(raw, None))
            except SAMPLE_ERRORS as err:
                done[key] = [SkipSample(f"{type(err).__name__}: {err}")]
        if not samples:
            return
        batch = collate(samples)
        if encoder is not None:
            text, mask = encoder.encode(batch["caption"])
        else:
            text, mask = batch["text_emb"], batch["text_mask"]
        text, mask = text.to(dev).float(), mask.to(dev)
        if negative_prompt is None:
            neg, neg_mask = torch.zeros_like(text), torch.ones_like(mask)
        else:
            if encoder is None:
                raise ValueError("a negative_prompt needs a text encoder")
            neg, neg_mask = (x.to(dev) for x in encoder.encode([negative_prompt] * len(samples)))
        controls = {modality: tok.encode(to_unit(batch["control"].to(dev))).float()} if modality else {}
        shape = tok.latent_shape(num_frames, height, width)
        noise = torch.stack([_noise(seed, s["key"], shape) for s in samples]).to(dev)
        cond = Cond(
            text=text,
            text_mask=mask,
            neg_text=neg.float(),
            neg_text_mask=neg_mask,
            controls=controls,
            fps=float(batch["fps"][0]),
        )
        states: dict[float, torch.Tensor] = {}

        def record(t: float, x: torch.Tensor) -> None:
            for want in times:
                if abs(t - want) < 1e-9:
                    states[want] = x.detach().clone()

        x0 = Sampler(net).sample(cond, noise, cfg, through=times, on_state=record)
        decoded = to_uint8(tok.decode(x0)).cpu()
        for i, s in enumerate(samples):
            done[s["key"]] = _members(
                s, batch, i, noise, states, times, x0, decoded, text, mask, modality, dtype, encode_video, settings
            )

    settings = {
        "teacher": str(teacher),
        "modality": modality,
        "guidance": guidance,
        "negative_prompt": negative_prompt,
        "sampler": sampler,
        "steps": steps,
        "shift": shift,
        "t_list": list(times),
        "seed": seed,
    }

    def build(key: str) -> list[tuple[str, bytes]]:
        if key not in done:
            start = mine.index(key)
            run(mine[start : start + batch_size])
        members = done.pop(key)
        if members and isinstance(members[0], SkipSample):
            raise members[0]
        return members

    config = dict(
        settings,
        frames=num_frames,
        size=[height, width],
        tokenizer=tokenizer,
        tokenizer_options=tokenizer_options or {},
        text_encoder=text_encoder,
        max_length=max_length,
        store_dtype=store_dtype,
        version=1,
    )
    paths = write_shards(
        target,
        mine,
        build,
        samples_per_shard,
        "kd",
        config,
        resume,
        progress,
        info={"source": "teacher samples", "rank": rank, "world": world},
        created_by="vidistill make-kd-data",
    )
    print(f"wrote {len(paths)} KD shards ({len(mine)} planned samples) to {target}")


def _members(
    sample, batch, i, noise, states, times, x0, decoded, text, mask, modality, dtype, encode_video, settings
) -> list[tuple[str, bytes]]:
    """One KD sample's shard members (see the module doc)."""
    import numpy as np
    import torch
    from safetensors.torch import save as st_save

    missing = [t for t in times if t not in states]
    if missing:
        raise RuntimeError(f"the teacher grid missed the student times {missing}")
    kd = {
        "noise": noise[i].to(dtype).cpu(),
        "states": torch.stack([states[t][i] for t in times]).to(dtype).cpu(),
        "t": torch.tensor(times, dtype=torch.float32),
        "x0": x0[i].to(dtype).cpu(),
    }
    fps = float(batch["fps"][i])
    members = []
    video = decoded[i].permute(1, 2, 3, 0).numpy()
    members.append(("mp4", encode_video(np.ascontiguousarray(video), fps)))
    if modality:
        control = batch["control"][i]
        kd[f"control.{modality}"] = control.contiguous()
        members.append(
            (f"{modality}.mp4", encode_video(np.ascontiguousarray(control.permute(1, 2, 3, 0).numpy()), fps))
        )
    meta = dict(settings, caption=sample["caption"], fps=fps, source_key=sample["key"], teacher_states=True)
    text_st = {"emb": text[i].to(dtype).cpu().contiguous(), "mask": mask[i].to(torch.uint8).cpu()}
    members += [
        ("txt", sample["caption"].encode()),
        ("json", json.dumps(meta).encode()),
        ("text.safetensors", st_save(text_st)),
        ("kd.safetensors", st_save({k: v.contiguous() for k, v in kd.items()})),
    ]
    return members
