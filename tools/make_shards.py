"""`vidistill make-shards`: videos + captions (or a Cosmos-Transfer1 KD folder, or the synthetic
default) -> webdataset shards, resumably.

Shard format (one sample per clip, see datamodules/video.py): ``{key}.mp4`` stored as it is,
``txt`` + ``json`` captions and metadata, control videos ``{modality}.mp4``, ``mask.mp4``,
``keypoint.json``, and for KD ``text.safetensors`` + ``kd.safetensors``. Shards are
``{prefix}-{index:06d}.tar``; ``{out}/index.json`` lists them with their sample counts.

Writing is resumable and crash-safe (`write_shards`): shard ``i`` always holds the same planned
samples (``samples_per_shard`` consecutive ones of the sorted list); each shard is written to
``name.tar.tmp`` and renamed when complete, so a file under a final name is always whole; and
``index.json`` is rewritten after every finished shard. A rerun keeps every shard that
index.json records with the same planned keys and options (or, with no index.json at all, every
shard whose keys are the planned ones) and writes the rest. Changed file *contents* under
unchanged names are not detected: pass ``--resume false`` after editing videos in place. Shards in
OUT that make-shards did not write (no index.json of its own) are refused unless ``--overwrite``.
"""

from __future__ import annotations

import json
import os
import pickle
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from datamodules.writer import CREATED_BY, SkipSample, read_index, write_shards

Members = list[tuple[str, bytes]]  # (extension, bytes) of one sample, in member order

__all__ = ["make_shards", "load_pickle_array"]

T1_TEXT_LENGTH = 512  # Cosmos-Transfer1's T5 sequence length; its pickles are trimmed to the real tokens


def _report(paths: list[str], out: str | os.PathLike) -> None:
    index = read_index(out) or {}
    skipped = index.get("skipped", {})
    note = "".join(f", {n} skipped ({reason})" for reason, n in skipped.items() if n)
    print(f"wrote {index.get('total', '?')} samples in {len(paths)} shards to {out}{note}")


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


def _key_of(rel: Path) -> str:
    """Sample key of a video at relative path `rel`: the path without its suffix, folders
    joined by ``__`` and dots replaced by ``_`` (webdataset splits a name at its first dot)."""
    parts = list(rel.with_suffix("").parts)
    return "__".join(p.replace(".", "_") for p in parts)


def _control_members(root: Path, rel: Path, modalities: Sequence[str]) -> Members:
    """Per-modality control files of the video at `rel`: ``root/<m>/<rel>.mp4`` and friends."""
    members: Members = []
    for m in modalities:
        path = root / m / rel.with_suffix(".mp4")
        if path.is_file():
            members.append((f"{m}.mp4", path.read_bytes()))
    mask = root / "mask" / rel.with_suffix(".mp4")
    if mask.is_file():
        members.append(("mask.mp4", mask.read_bytes()))
    keypoints = root / "keypoint" / rel.with_suffix(".json")
    if keypoints.is_file():
        members.append(("keypoint.json", keypoints.read_bytes()))
    return members


def _probe_fields(data: bytes, rel: Path) -> dict:
    from datamodules.codec import VideoDecodeError, probe

    try:
        info = probe(data)
    except VideoDecodeError as e:
        warnings.warn(f"{rel}: not a decodable video ({e}); skipped", stacklevel=3)
        raise SkipSample("undecodable video") from e
    return {"fps": info.fps, "frames": info.frames, "width": info.width, "height": info.height}


def _folder(
    src: Path, out: str, samples_per_shard: int, prefix: str, recursive: bool, resume: bool, progress: bool
) -> list[str]:
    from datamodules.controls import MODALITIES

    side = set(MODALITIES) | {"mask"}  # control sub-folders: never source videos
    pattern = "**/*.mp4" if recursive else "*.mp4"
    videos = sorted(p.relative_to(src) for p in src.glob(pattern) if p.is_file())
    videos = [rel for rel in videos if rel.parts[0] not in side]
    if not videos:
        raise ValueError(
            f"no *.mp4 videos in {src}" + ("" if recursive else " (--recursive true searches sub-folders)")
        )
    by_key: dict[str, Path] = {}
    missing: list[str] = []
    for rel in videos:
        caption = src / rel.with_suffix(".txt")
        if not caption.is_file():
            missing.append(str(rel))
            continue
        key = _key_of(rel)
        if key in by_key:
            raise ValueError(f"{rel} and {by_key[key]} map to the same sample key {key!r}; rename one")
        by_key[key] = rel
    if missing:
        warnings.warn(
            f"{len(missing)} video(s) have no .txt caption and are skipped: "
            f"{', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}",
            stacklevel=3,
        )
    if not by_key:
        raise ValueError(f"none of the {len(videos)} videos in {src} has a same-stem .txt caption")

    def build(key: str) -> Members:
        rel = by_key[key]
        data = (src / rel).read_bytes()
        meta = _probe_fields(data, rel)
        caption = (src / rel.with_suffix(".txt")).read_text(encoding="utf-8").strip()
        controls = _control_members(src, rel, MODALITIES)
        meta = {"caption": caption, **meta, "source": rel.as_posix(), "controls": [e for e, _ in controls]}
        return [("mp4", data), ("txt", caption.encode("utf-8")), ("json", json.dumps(meta).encode())] + controls

    config = {"mode": "folder", "src": str(src.resolve())}
    info = {"source": str(src.resolve()), "skipped_no_caption": missing[:100]}
    return write_shards(
        out,
        list(by_key),
        build,
        samples_per_shard,
        prefix,
        config,
        resume,
        progress,
        info,
        skipped={"no caption": missing},
    )


def load_pickle_array(path: Path, what: str) -> Any:
    """The array in a Cosmos-Transfer1 pickle, as a torch tensor.

    Accepted: a numpy array or torch tensor; a list/tuple holding one (Transfer1's
    ``get_t5_embeddings.py`` pickles ``[array (L, D)]``); a dict with the array under one of
    ``emb, embedding, embeddings, t5_xxl, text_embeddings, encoded_text, noise, array, data`` or
    as its only array value. Leading batch dimensions of size 1 are dropped by the caller.
    ``pickle.load`` runs arbitrary code from the file: use this on trusted data only.
    """
    import numpy as np
    import torch

    with open(path, "rb") as f:
        obj = pickle.load(f)  # trusted data only (see docstring)
    if isinstance(obj, (list, tuple)) and len(obj) == 1:
        obj = obj[0]
    if isinstance(obj, dict):
        names = (
            "emb",
            "embedding",
            "embeddings",
            "t5_xxl",
            "text_embeddings",
            "encoded_text",
            "noise",
            "array",
            "data",
        )
        arrays = {k: v for k, v in obj.items() if isinstance(v, (np.ndarray, torch.Tensor))}
        hit = next((k for k in names if k in arrays), None)
        if hit is None and len(arrays) == 1:
            hit = next(iter(arrays))
        if hit is None:
            raise ValueError(f"{path}: {what} pickle is a dict without a known array key (keys: {sorted(obj)})")
        obj = obj[hit]
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind != "f":
            raise ValueError(f"{path}: {what} must be a float array, got {obj.dtype}")
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().contiguous()
    raise ValueError(f"{path}: {what} pickle holds a {type(obj).__name__}, expected a numpy array")


def _squeeze(t: Any, ndim: int, path: Path, what: str) -> Any:
    while t.ndim > ndim and t.shape[0] == 1:
        t = t[0]
    if t.ndim != ndim:
        raise ValueError(f"{path}: {what} has shape {tuple(t.shape)}, expected {ndim} dims")
    return t.contiguous()


def _transfer1(src: Path, out: str, samples_per_shard: int, prefix: str, resume: bool, progress: bool) -> list[str]:
    videos_dir = src / "videos"
    videos = sorted(videos_dir.glob("*.mp4")) if videos_dir.is_dir() else []
    if not videos:
        raise ValueError(f"{src} is not a Cosmos-Transfer1 KD folder: no videos/*.mp4 in it")
    print(
        "Cosmos-Transfer1 KD data holds the input noise and the teacher's output video but no "
        "intermediate teacher states: these shards support 1-step KD only (noise -> video; KDWarmup "
        "with t_list [1.0] encodes the video with the recipe's tokenizer, the one the noise was drawn in)."
    )
    by_key, missing = _transfer1_complete(src, videos)
    config = {"mode": "transfer1", "src": str(src.resolve())}
    info = {
        "source": str(src.resolve()),
        "kd": "transfer1",
        "teacher_states": False,
        "skipped_incomplete": missing[:100],
    }
    return write_shards(
        out,
        list(by_key),
        lambda key: _transfer1_sample(src, by_key[key]),
        samples_per_shard,
        prefix,
        config,
        resume,
        progress,
        info,
        skipped={"no t5_xxl or noise pickle": missing},
    )


def _transfer1_complete(src: Path, videos: list[Path]) -> tuple[dict[str, Path], list[str]]:
    """The videos with both pickles, by sample key, and the stems of those without."""
    by_key: dict[str, Path] = {}
    missing: list[str] = []
    for video in videos:
        stem = video.stem
        need = [src / "t5_xxl" / f"{stem}.pickle", src / "noise" / f"{stem}.pickle"]
        if not all(p.is_file() for p in need):
            missing.append(stem)
            continue
        key = _key_of(Path(video.name))
        if key in by_key:
            raise ValueError(f"{video.name} and {by_key[key].name} map to the same sample key {key!r}")
        by_key[key] = video
    if missing:
        warnings.warn(
            f"{len(missing)} video(s) lack t5_xxl/ or noise/ pickles and are skipped: {', '.join(missing[:5])}",
            stacklevel=4,
        )
    if not by_key:
        raise ValueError(f"no video in {src / 'videos'} has both t5_xxl/<stem>.pickle and noise/<stem>.pickle")
    return by_key, missing


def _transfer1_sample(src: Path, video: Path) -> Members:
    """One Transfer1 KD example as shard members: the teacher's video, its caption, its controls,
    the padded T5 embedding and the noise."""
    from safetensors.torch import save as st_save

    from datamodules.formats import TEXT_MEMBER

    stem = video.stem
    data = video.read_bytes()
    meta = _probe_fields(data, Path(video.name))
    caption = ""
    for txt in (video.with_suffix(".txt"), src / "metas" / f"{stem}.txt"):
        if txt.is_file():
            caption = txt.read_text(encoding="utf-8").strip()
            break
    try:
        emb = _squeeze(load_pickle_array(src / "t5_xxl" / f"{stem}.pickle", "t5_xxl"), 2, video, "t5_xxl embedding")
        noise = _squeeze(load_pickle_array(src / "noise" / f"{stem}.pickle", "noise"), 4, video, "noise")
    except (ValueError, pickle.UnpicklingError, EOFError) as e:
        warnings.warn(f"{stem}: {e}; skipped", stacklevel=2)
        raise SkipSample("unreadable pickle") from e
    controls = _transfer1_controls(src, stem)
    meta = {
        "caption": caption,
        **meta,
        "source": f"videos/{video.name}",
        "kd": "transfer1",
        "teacher_states": False,
        "text_tokens": emb.shape[0],
        "controls": [e for e, _ in controls],
    }
    return [
        ("mp4", data),
        ("txt", caption.encode("utf-8")),
        ("json", json.dumps(meta).encode()),
        *controls,
        (TEXT_MEMBER, _transfer1_text(emb)),
        ("kd.safetensors", st_save({"noise": noise})),
    ]


def _transfer1_text(emb: Any) -> bytes:
    """text.safetensors of a Transfer1 T5 embedding, zero-padded to 512 tokens as Transfer1's data
    loader pads it (its pickles hold the real tokens only); the mask marks the real ones."""
    import torch

    from datamodules.formats import save_text

    tokens = emb.shape[0]
    mask = torch.ones(max(tokens, T1_TEXT_LENGTH), dtype=torch.uint8)
    if tokens < T1_TEXT_LENGTH:
        mask[tokens:] = 0
        emb = torch.cat([emb, emb.new_zeros(T1_TEXT_LENGTH - tokens, emb.shape[1])])
    return save_text(emb, mask)


def _transfer1_controls(src: Path, stem: str) -> Members:
    """The example's control videos, each stored under our modality name (Transfer1 calls the blur
    control "vis"); the first folder found for a modality wins."""
    from datamodules.controls import MODALITIES

    controls: Members = []
    for folder, m in ({m: m for m in MODALITIES} | {"vis": "blur"}).items():
        path = src / folder / f"{stem}.mp4"
        if path.is_file() and f"{m}.mp4" not in dict(controls):
            controls.append((f"{m}.mp4", path.read_bytes()))
    return controls


def _refuse_foreign(out: str | os.PathLike, prefix: str, overwrite: bool) -> None:
    """Shards that make-shards did not write (OUT has no index.json of its own) are not
    overwritten unless asked: they may be a dataset copied there or another tool's output."""
    if overwrite:
        return
    index = read_index(out)
    if index is not None and index.get("created_by", CREATED_BY) == CREATED_BY:
        return
    found = sorted(Path(out).glob(f"{prefix}-*.tar"))
    if found:
        whose = "no index.json" if index is None else f"index.json by {index.get('created_by')!r}"
        raise FileExistsError(
            f"{found[0]} was not written by make-shards ({out} has {whose}) and would be overwritten: "
            "pass --overwrite true to replace it, or choose another --out"
        )


def _names(text: str) -> tuple[str, ...]:
    """The names of a comma-separated list ("" -> none)."""
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _parse_shape(text: str, n: int, what: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) != n or min(shape) < 1:
        raise ValueError(f"{what} must be {n} positive integers joined by 'x', got {text!r}")
    return shape


def make_shards(
    src: str | None = None,
    out: str = "shards",
    samples_per_shard: int = 100,
    prefix: str = "train",
    synthetic: str | None = None,
    num_samples: int = 64,
    num_frames: int = 33,
    height: int = 64,
    width: int = 96,
    fps: float = 24.0,
    controls: str = "edge",
    floors: str = "textured",
    floor_colours: str = "all",
    shape_scale: float = 1.0,
    latent_shape: str = "16x24x88x160",
    text_shape: str = "512x1024",
    seed: int = 0,
    transfer1_kd: bool = False,
    recursive: bool = False,
    resume: bool = True,
    progress: bool = True,
    overwrite: bool = False,
) -> None:
    """Write webdataset shards from a folder of captioned videos, a Cosmos-Transfer1 KD folder or the
    synthetic default.

    A folder: every ``*.mp4`` with a same-stem ``.txt`` caption becomes one sample (videos
    without a caption are skipped, warned about and counted in index.json). Optional controls
    beside it: ``src/<modality>/<stem>.mp4`` for edge, blur, depth, seg, keypoint,
    ``src/mask/<stem>.mp4`` and ``src/keypoint/<stem>.json``. Video bytes are stored as they
    are (never re-encoded); fps, frame count and size from the container go into the json.

    ``--transfer1_kd true``: ``src`` is a Cosmos-Transfer1 KD folder (``videos/*.mp4`` teacher
    outputs, ``t5_xxl/*.pickle`` text embeddings, ``noise/*.pickle`` input noise, ``edge/*.mp4``
    or other control folders; ``vis/`` becomes ``blur.mp4``). Captions come from
    ``videos/<stem>.txt`` or ``metas/<stem>.txt``, else "". The embeddings go to
    ``text.safetensors`` (zero-padded to 512 tokens, mask marking the real ones) and the noise
    to ``kd.safetensors`` ("noise" only). That layout holds no intermediate teacher states, so
    these shards support 1-step KD only (json ``teacher_states: false``), and no clean latent:
    KDWarmup (``t_list: [1.0]``, ``use_kd``) encodes the teacher's video with the recipe's
    tokenizer, which must be the one the noise was drawn in (Transfer1's Cosmos tokenizer,
    ``cosmos-jit``), at the videos' frame count and size. Pickles are read with ``pickle.load``,
    which can run code: convert trusted data only.

    Args:
        src: folder of videos (or the KD folder with --transfer1_kd); not used with --synthetic.
        out: output folder for the shards and index.json.
        samples_per_shard: samples per shard.
        prefix: shard names are ``{prefix}-{index:06d}.tar``.
        synthetic: ``video`` (moving-shape clips with captions and real controls) or ``latent``
            (random latents and text embeddings at a given shape, no videos; for GPU
            benchmarks) instead of ``src``.
        num_samples: synthetic: number of clips.
        num_frames: synthetic video: frames per clip.
        height: synthetic video: frame height (even).
        width: synthetic video: frame width (even).
        fps: synthetic: frame rate written to the videos and json.
        controls: synthetic: comma-separated control modalities (video: computed ones, edge
            and/or blur; latent: names of the ``control.<m>`` latents); "" for none.
        floors: synthetic video: ``textured`` (striped, checkered, dotted, gradient), ``plain``
            (one flat colour: the shapes' outlines are the only edges; the quickstart's), or a
            comma-separated mix of those pattern names.
        floor_colours: synthetic video: ``all`` or comma-separated floor colours (gray, brown,
            navy, olive, teal, maroon, black); one colour makes the floor predictable without
            the caption (the quickstart's: a tiny model learns it in minutes).
        shape_scale: synthetic video: multiplies every shape's size (1: radii of 7-20% of the
            shorter side).
        latent_shape: synthetic latent: ``CxTxHxW`` of each latent (default: Wan2.1 latents
            of a 720p 93-frame clip).
        text_shape: synthetic latent: ``LxD`` of the text embedding (the 2b preset's text
            projection takes D = 100352, Transfer2.5's Reason1 embedding).
        seed: synthetic: seed; the same seed gives byte-identical shards.
        transfer1_kd: read ``src`` as a Cosmos-Transfer1 KD folder.
        recursive: folder: also take videos from sub-folders (not the control folders); keys
            join the folders with ``__``.
        resume: keep the shards a previous run finished (see index.json); False rewrites all.
        progress: show a progress bar.
        overwrite: replace ``{prefix}-*.tar`` files in ``out`` that make-shards did not write
            (``out`` has no index.json of its own); without it they are refused, nothing written.
    """
    _refuse_foreign(out, prefix, overwrite)
    if synthetic is not None:
        if src is not None or transfer1_kd:
            raise ValueError("--synthetic makes its own data: give no src and no --transfer1_kd")
        from datamodules.synthetic import PATTERNS, write_latent_shards, write_synthetic_shards

        mods = _names(controls)
        if synthetic == "video":
            pats = PATTERNS if floors == "textured" else _names(floors)
            colours = None if floor_colours == "all" else _names(floor_colours)
            paths = write_synthetic_shards(
                out,
                num_samples,
                samples_per_shard,
                num_frames,
                height,
                width,
                fps,
                seed,
                mods,
                progress,
                prefix=prefix,
                resume=resume,
                floors=pats,
                floor_colours=colours,
                shape_scale=shape_scale,
            )
        elif synthetic == "latent":
            shape = _parse_shape(latent_shape, 4, "latent_shape")
            text = _parse_shape(text_shape, 2, "text_shape")
            paths = write_latent_shards(
                out,
                num_samples,
                shape,
                text,
                samples_per_shard,
                seed,
                control_modalities=mods,
                fps=fps,
                prefix=prefix,
                resume=resume,
                progress=progress,
            )
        else:
            raise ValueError(f"synthetic must be 'video' or 'latent', got {synthetic!r}")
        _report(paths, out)
        return
    if src is None:
        raise ValueError("give a source folder (src) or --synthetic video|latent")
    root = Path(src)
    if not root.is_dir():
        raise FileNotFoundError(f"source folder {src!r} does not exist")
    if transfer1_kd:
        paths = _transfer1(root, out, samples_per_shard, prefix, resume, progress)
    else:
        paths = _folder(root, out, samples_per_shard, prefix, recursive, resume, progress)
    _report(paths, out)
