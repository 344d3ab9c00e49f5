"""`vidistill make-specs`: held-out clips of a shard folder -> inference specs (Transfer2.5 JSON).

    vidistill make-specs runs/quickstart/data/val --out specs --controls edge,vis --num 8

Writes OUT/videos/<key>.mp4 (the clip's own bytes), OUT/videos/<key>.shapes.npy (its shape
masks, when the shard carries them: the synthetic clips do) and OUT/<file> (default specs.jsonl), one
spec per clip: its caption as prompt, the clip as video_path, its size as resolution and its frame
count as max_frames, one control block per name in `controls` (computed on the fly from the video
by infer). So a model is evaluated on the very clips its validation used, through `vidistill infer`
and `vidistill evaluate --reference OUT/videos` (PSNR against the clip, shape IoU against its masks).
"""

from __future__ import annotations

import json
from pathlib import Path

from modules.spec import ControlSpec


def make_specs(
    shards: str,
    *,
    out: str,
    controls: str = "edge",
    num: int | None = None,
    file: str = "specs.jsonl",
    num_steps: int | None = None,
    guidance: float | None = None,
    control_weight: float = ControlSpec.control_weight,
    seed: int | None = None,
) -> Path:
    """Write one spec per clip of `shards` (a folder of .tar shards or one .tar).

    Args:
        shards: shard folder (as make-shards writes it) or a single .tar.
        out: output folder; videos go to OUT/videos.
        controls: comma-separated spec control keys (edge, vis, depth, seg, keypoint); depth, seg
            and keypoint must be in the shard as <key>.<modality>.mp4. Empty: no control (text2world,
            video2world).
        num: at most this many clips (default: all).
        file: name of the spec file written in OUT (.jsonl).
        num_steps: written into every spec (default: left out, so infer takes the spec default).
        guidance: written into every spec (default: left out, so infer takes the spec default).
        control_weight: weight of every control block (default: the spec default).
        seed: the specs' sampling seeds derive from it (clip i: mix_seed(seed, i)); default: clip
            i has seed i.

    Returns the path of the spec file.
    """
    import webdataset as wds

    from datamodules.codec import probe
    from datamodules.files import write_bytes, write_text
    from datamodules.seeds import mix_seed
    from datamodules.shards import check_tars, expand_shards
    from datamodules.synthetic import SHAPES_MEMBER
    from modules.spec import MODALITY_NAMES

    keys = [k for k in controls.split(",") if k]
    unknown = [k for k in keys if k not in MODALITY_NAMES]
    if unknown:
        raise ValueError(f"unknown control(s) {unknown}; choose from {', '.join(MODALITY_NAMES)}")
    urls = expand_shards(shards)
    check_tars(urls)  # before anything is written
    root = Path(out)
    lines = []
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        if num is not None and len(lines) >= num:
            break
        key = sample["__key__"].replace("/", "_")
        if "mp4" not in sample:
            continue
        (root / "videos").mkdir(parents=True, exist_ok=True)
        write_bytes(root / "videos" / f"{key}.mp4", sample["mp4"])
        if SHAPES_MEMBER in sample:
            write_bytes(root / "videos" / f"{key}.shapes.npy", sample[SHAPES_MEMBER])
        caption = sample["txt"].decode() if "txt" in sample else json.loads(sample["json"])["caption"]
        info = probe(sample["mp4"])
        spec = {
            "name": key,
            "prompt": caption.strip(),
            "video_path": f"videos/{key}.mp4",
            "seed": len(lines) if seed is None else mix_seed(seed, len(lines)),
            "resolution": f"{info.height}x{info.width}",
            "max_frames": info.frames,
        }
        spec.update({k: v for k, v in dict(num_steps=num_steps, guidance=guidance).items() if v is not None})
        for k in keys:
            block = {"control_weight": control_weight}
            stored = MODALITY_NAMES[k] + ".mp4"
            if stored in sample and k not in ("edge", "vis"):
                path = root / "videos" / f"{key}.{stored}"
                write_bytes(path, sample[stored])
                block["control_path"] = f"videos/{path.name}"
            spec[k] = block
        lines.append(json.dumps(spec))
    if not lines:
        raise ValueError(f"{shards}: no clips with an mp4 found")
    write_text(root / file, "\n".join(lines) + "\n")
    print(f"wrote {root / file}: {len(lines)} spec(s)")
    return root / file
