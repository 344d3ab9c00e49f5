"""`vidistill encode-text`: add precomputed text embeddings (and optionally latents) to shards.

Reads existing shards and writes one output shard per input shard, same name, in which every
original member is copied byte for byte and each sample gains ``text.safetensors`` ("emb"
(L, D), "mask" (L,) uint8) from its caption, and with ``--tokenizer`` also
``latent.safetensors`` ("latent" (C, T', H', W') and "control.<modality>" for each control video
present). Precomputing moves the text encoder (a 7B LLM for Transfer2.5) and the VAE out of the
training loop. A member that is regenerated (an older ``text.safetensors``) is replaced.

Output shards are written to ``name.tar.tmp`` and renamed when complete, so `out` may be the
input folder itself (in place). ``{out}/index.json`` records every finished shard with the
options it was encoded with; a rerun skips those (``--resume false`` redoes everything).
"""

from __future__ import annotations

import warnings
from pathlib import Path

__all__ = ["encode_text", "video_latents"]


def _caption(ext: dict[str, bytes]) -> str | None:
    import json

    if "txt" in ext:
        return ext["txt"].decode("utf-8").strip()
    if "json" in ext:
        try:
            meta = json.loads(ext["json"])
        except ValueError:
            return None
        if isinstance(meta, dict) and isinstance(meta.get("caption"), str):
            return meta["caption"].strip()
    return None


def video_latents(
    ext: dict[str, bytes], tokenizer, num_frames=None, height=None, width=None, stride=1, target_fps=None, device="cpu"
) -> dict:
    """Latents of a sample's first clip: ``{"latent": (C, T', H', W'), "control.<m>": ...}``.

    The clip is the one the datamodule reads with latents: frames ``clip_indices(total,
    num_frames, stride, fps, target_fps, start=0)`` (every frame when `num_frames` is None),
    `resize_crop` to ``height x width`` (native size when None); control videos the same, with
    the modality's interpolation (nearest for seg).
    """
    import numpy as np
    import torch

    from datamodules.codec import clip_indices, decode_video, probe, resize_crop
    from datamodules.controls import CONTROL_INTERPOLATION, MODALITIES

    indices = None
    if num_frames is not None:
        info = probe(ext["mp4"])
        total = info.frames if info.frames > 0 else len(decode_video(ext["mp4"])[0])
        indices = clip_indices(total, num_frames, stride, info.fps if target_fps else None, target_fps, 0)

    def encode(data: bytes, interpolation) -> torch.Tensor:
        frames, _ = decode_video(data, indices)
        if height is not None:
            frames = resize_crop(frames, height, width, interpolation)
        video = torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2)[None]
        video = video.to(device=device, dtype=torch.float32) / 127.5 - 1.0
        return tokenizer.encode(video)[0].float().cpu().contiguous()

    out = {"latent": encode(ext["mp4"], CONTROL_INTERPOLATION["edge"])}
    for m in MODALITIES:
        if f"{m}.mp4" in ext:
            out[f"control.{m}"] = encode(ext[f"{m}.mp4"], CONTROL_INTERPOLATION[m])
    return out


def encode_text(
    shards: str | list[str],
    out: str,
    text_encoder: str = "tiny",
    max_length: int | None = None,
    batch_size: int = 16,
    device: str = "cpu",
    dtype: str | None = None,
    tokenizer: str | None = None,
    tokenizer_path: str | None = None,
    video_height: int | None = None,
    video_width: int | None = None,
    num_frames: int | None = None,
    stride: int = 1,
    target_fps: float | None = None,
    resume: bool = True,
    progress: bool = True,
) -> None:
    """Add text embeddings (and optionally video latents) to existing shards, writing new ones to out.

    Each sample's caption (``txt``, else ``json`` "caption") is encoded to ``text.safetensors``;
    a sample without a caption is copied unchanged and counted. With ``--tokenizer`` each
    sample's first clip (the one the datamodule uses with latents) is encoded to
    ``latent.safetensors``, and each control video present to "control.<modality>"; a sample
    whose video cannot be decoded or is too short keeps no latents and is counted.

    Args:
        shards: input shards: a brace pattern, a glob, a folder (all ``*.tar``) or a list.
        out: output folder (may be the input folder: shards are replaced atomically).
        text_encoder: "tiny" (the embedded default, ``TextEncoder.tiny()``) or a local
            transformers directory (T5 or a decoder LLM, see modules/text.py).
        max_length: tokens per prompt; None: the encoder's default (64 for tiny, 512 otherwise).
        batch_size: captions per text-encoder call.
        device: device for the encoders ("cpu", "cuda", ...).
        dtype: stored dtype of embeddings and latents (float32, float16, bfloat16); None keeps
            the encoder's output dtype. Also the dtype a local text encoder is loaded in.
        tokenizer: video tokenizer kind (pixel, cosmos-jit, wan2.1); None: no latents.
        tokenizer_path: local weights of the tokenizer (not needed for pixel).
        video_height: clip height for latents (with video_width); None: the video's own size.
        video_width: clip width for latents.
        num_frames: clip length for latents; None: every frame of the video.
        stride: take every stride-th frame for latents (as the datamodule's stride).
        target_fps: resample the latent clip to this rate (as the datamodule's target_fps).
        resume: skip output shards index.json records as encoded with the same options.
        progress: show a progress bar.
    """
    from datamodules.shards import expand_shards
    from datamodules.writer import add_to_shards, output_names
    from modules.dtypes import to_dtype

    if (video_height is None) != (video_width is None):
        raise ValueError("give both video_height and video_width, or neither")
    store = to_dtype(dtype, "--dtype", allow_none=True)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if tokenizer is None and any(v is not None for v in (video_height, num_frames, tokenizer_path)):
        raise ValueError("video_height/video_width/num_frames/tokenizer_path need --tokenizer")
    urls = expand_shards(shards)
    output_names(urls)  # clashing names fail before an encoder is loaded
    encoder = _text_encoder(text_encoder, max_length, store, device)
    tok = None
    if tokenizer is not None:
        from modules.tokenizer import build_tokenizer

        tok = build_tokenizer(tokenizer, tokenizer_path).to(device)
    options = {
        "text_encoder": text_encoder,
        "max_length": encoder.max_length,
        "dtype": dtype,
        "tokenizer": tokenizer,
        "tokenizer_path": tokenizer_path,
        "size": [video_height, video_width],
        "num_frames": num_frames,
        "stride": stride,
        "target_fps": target_fps,
    }
    counts = {"no caption": 0, "no latents": 0}
    latents = None
    if tok is not None:

        def latents(ext: dict[str, bytes]) -> dict:
            return video_latents(ext, tok, num_frames, video_height, video_width, stride, target_fps, device)

    add = _new_members(encoder, store, latents, counts)
    entries = add_to_shards(urls, out, add, options, batch_size, resume, progress, counts=counts)
    total = sum(e["samples"] for e in entries)
    notes = "".join(f", {n} with {reason}" for reason, n in counts.items() if n)
    print(f"encoded {total} samples in {len(entries)} shards to {Path(out)}{notes}")


def _text_encoder(name: str, max_length: int | None, dtype, device: str):
    """The tiny default or a local transformers directory, on `device`."""
    from modules.text import TextEncoder

    if name == "tiny":
        encoder = TextEncoder.tiny() if max_length is None else TextEncoder.tiny(max_length=max_length)
        return encoder.to(device)
    if not Path(name).is_dir():
        raise FileNotFoundError(f"text encoder {name!r} is neither 'tiny' nor a local directory")
    return TextEncoder.from_pretrained(name, max_length=max_length or 512, dtype=dtype, device=device)


def _new_members(encoder, store, latents, counts: dict[str, int]):
    """`add_to_shards`' callback: a batch's samples -> their text.safetensors (and latent.safetensors
    when `latents` is given), counting the samples without a caption or without latents."""
    from safetensors.torch import save as st_save

    from datamodules.codec import VideoDecodeError
    from datamodules.formats import TEXT_MEMBER, save_text
    from datamodules.writer import member_exts

    def add(batch: list, shard: str) -> list[dict[str, bytes]]:
        exts = [member_exts(key, members) if key is not None else {} for key, members in batch]
        captions = [_caption(ext) if key is not None else None for (key, _), ext in zip(batch, exts)]
        captioned = [i for i, cap in enumerate(captions) if cap is not None]
        texts = {}
        if captioned:
            emb, mask = encoder.encode([captions[i] for i in captioned])
            # cast on the CPU, after the move, as the shards written so far were
            texts = {i: save_text(emb[j].cpu(), mask[j].cpu(), store) for j, i in enumerate(captioned)}
        out = []
        for i, ((key, _), ext) in enumerate(zip(batch, exts)):
            new = {}
            if key is None:
                out.append(new)
                continue
            if i in texts:
                new[f"{key}.{TEXT_MEMBER}"] = texts[i]
            else:
                counts["no caption"] += 1
            if latents is not None:
                try:
                    if "mp4" not in ext:
                        raise VideoDecodeError("sample has no mp4")
                    lat = latents(ext)
                    new[f"{key}.latent.safetensors"] = st_save({k: v.to(store) if store else v for k, v in lat.items()})
                except VideoDecodeError as err:
                    counts["no latents"] += 1
                    warnings.warn(f"{shard}: {key}: no latents ({err})", stacklevel=2)
            out.append(new)
        return out

    return add
