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

import os
import tarfile
import warnings
from pathlib import Path

from tqdm.auto import tqdm

__all__ = ["encode_text", "video_latents"]

_DTYPES = ("float32", "float16", "bfloat16")


def _read_samples(url: str):
    """Yield ``(key, [(member name, bytes), ...])`` per sample, original names and order kept."""
    from datamodules.shards import split_name

    key, members = None, []
    with tarfile.open(url, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            f = tar.extractfile(member)
            data = f.read() if f is not None else b""
            split = split_name(member.name)
            k = split[0] if split is not None else None
            if k is not None and k != key:
                if members:
                    yield key, members
                key, members = k, []
            members.append((member.name, data))
    if members:
        yield key, members


def _exts(key: str | None, members: list) -> dict[str, bytes]:
    """Members by lower-cased extension (as the datamodule sees them)."""
    from datamodules.shards import split_name

    out = {}
    for name, data in members:
        split = split_name(name)
        if split is not None and split[0] == key:
            out[split[1]] = data
    return out


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
    import torch
    from safetensors.torch import save as st_save

    from datamodules.codec import VideoDecodeError
    from datamodules.shards import expand_shards
    from datamodules.writer import TarOut, config_digest, read_index, write_index
    from modules.text import TextEncoder

    if (video_height is None) != (video_width is None):
        raise ValueError("give both video_height and video_width, or neither")
    if dtype is not None and dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if tokenizer is None and any(v is not None for v in (video_height, num_frames, tokenizer_path)):
        raise ValueError("video_height/video_width/num_frames/tokenizer_path need --tokenizer")
    urls = expand_shards(shards)
    names = [os.path.basename(u) for u in urls]
    if len(set(names)) != len(names):
        raise ValueError("input shards from different folders share file names; encode them into separate folders")
    store = getattr(torch, dtype) if dtype else None
    if text_encoder == "tiny":
        encoder = TextEncoder.tiny() if max_length is None else TextEncoder.tiny(max_length=max_length)
        encoder = encoder.to(device)
    else:
        if not Path(text_encoder).is_dir():
            raise FileNotFoundError(f"text encoder {text_encoder!r} is neither 'tiny' nor a local directory")
        encoder = TextEncoder.from_pretrained(text_encoder, max_length=max_length or 512, dtype=store, device=device)
    tok = None
    if tokenizer is not None:
        from modules.tokenizer import build_tokenizer

        tok = build_tokenizer(tokenizer, tokenizer_path).to(device)

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
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
    fingerprint = config_digest(options)
    old = read_index(out_dir) or {}
    # an input folder's own index.json (make-shards) carries over what it knew
    src_dirs = {os.path.dirname(os.path.abspath(u)) for u in urls}
    src_index = read_index(next(iter(src_dirs))) if len(src_dirs) == 1 else None
    fields = {
        k: v for k, v in (src_index or old).items() if k not in ("shards", "total", "complete", "encoded", "skipped")
    }
    fields.update(created_by="vidistill encode-text", encoded=options)
    entries = {}
    if resume:
        for e in old.get("shards", []):
            path = out_dir / e["name"]
            if (
                e.get("encoded") == fingerprint
                and e["name"] in names
                and path.is_file()
                and path.stat().st_size == e.get("bytes")
            ):
                entries[e["name"]] = e
    counts = {"no caption": 0, "no latents": 0}
    todo = [(u, n) for u, n in zip(urls, names) if n not in entries]
    if entries:
        print(f"resuming: {len(entries)} of {len(urls)} shards are already encoded in {out_dir}")
    bar = tqdm(todo, desc="encode shards", unit="shard", disable=not progress)

    def flush(writer: TarOut, batch: list) -> None:
        captioned = [i for i, (_, _, cap) in enumerate(batch) if cap is not None]
        embs = {}
        if captioned:
            emb, mask = encoder.encode([batch[i][2] for i in captioned])
            for j, i in enumerate(captioned):
                e = emb[j].cpu()
                embs[i] = {"emb": (e.to(store) if store else e).contiguous(), "mask": mask[j].cpu().to(torch.uint8)}
        for i, (key, members, _) in enumerate(batch):
            if key is None:  # members webdataset skips (e.g. __meta__ files): copied as they are
                for name, data in members:
                    writer.add_member(name, data)
                continue
            new = {}
            if i in embs:
                new[f"{key}.text.safetensors"] = st_save(embs[i])
            else:
                counts["no caption"] += 1
            if tok is not None:
                ext = _exts(key, members)
                try:
                    if "mp4" not in ext:
                        raise VideoDecodeError("sample has no mp4")
                    lat = video_latents(ext, tok, num_frames, video_height, video_width, stride, target_fps, device)
                    new[f"{key}.latent.safetensors"] = st_save({k: v.to(store) if store else v for k, v in lat.items()})
                except VideoDecodeError as err:
                    counts["no latents"] += 1
                    warnings.warn(f"{writer.path}: {key}: no latents ({err})", stacklevel=2)
            for name, data in members:
                if name not in new:
                    writer.add_member(name, data)
            for name, data in new.items():
                writer.add_member(name, data)
            writer.samples += 1

    def save(complete: bool) -> None:
        write_index(out_dir, entries.values(), complete=complete, **fields, skipped=dict(counts))

    save(complete=not todo)
    for url, name in bar:
        writer = TarOut(out_dir / name)
        try:
            batch: list = []
            for key, members in _read_samples(url):
                batch.append((key, members, _caption(_exts(key, members)) if key is not None else None))
                if len(batch) == batch_size:
                    flush(writer, batch)
                    batch = []
            if batch:
                flush(writer, batch)
        except BaseException:
            writer.abort()
            raise
        n = writer.samples
        entries[name] = {"name": name, "samples": n, "bytes": writer.commit(), "encoded": fingerprint}
        save(complete=False)
    save(complete=True)
    total = sum(e["samples"] for e in entries.values())
    notes = "".join(f", {n} with {reason}" for reason, n in counts.items() if n)
    print(f"encoded {total} samples in {len(entries)} shards to {out_dir}{notes}")
