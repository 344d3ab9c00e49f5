"""Scoring of `vidistill infer` outputs (what `vidistill evaluate` reports): per clip, the
controls recomputed the way infer made them (the resolved spec in `<name>.json`) and the video
scored against them (Edge F1 for an edge control, Blur SSIM against the input video for a vis
control), and against ground truth where a reference folder has it (PSNR against `<name>.mp4`,
shape IoU against `<name>.shapes.npy`, colour match against both); per run, means over clips
with standard deviations; the markdown table and the SVG bar chart of the result."""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from statistics import mean, stdev

import numpy as np


def load_generated(run: Path, info: dict) -> np.ndarray:
    """The generated frames at generation size, from the lossless .mkv when infer wrote one."""
    import cv2

    from datamodules.codec import decode_video

    name = info["spec"]["name"]
    file = run / f"{name}.mkv"
    file = file if file.is_file() else run / f"{name}.mp4"
    frames, _ = decode_video(file.read_bytes())
    h, w = info["height"], info["width"]
    if frames.shape[1:3] != (h, w):  # keep_input_resolution wrote it at the input's size
        frames = np.stack([cv2.resize(f, (w, h), interpolation=cv2.INTER_AREA) for f in frames])
    return frames


# the measures averaged over clips, each with its standard deviation (`<key>_std`)
SCORES = ("shape_iou", "colour_match", "psnr", "edge_f1", "blur_ssim")


def score_reference(video: np.ndarray, name: str, reference: Path) -> dict:
    """PSNR against `reference/<name>.mp4` and shape IoU against `reference/<name>.shapes.npy`,
    each where the file exists, and colour match where both do, over the frames they have.
    Colour match is None for a clip whose masks are empty (no shape, so no colour to match)."""
    import cv2

    from datamodules.codec import decode_video
    from datamodules.metrics import colour_match, psnr, shape_iou
    from datamodules.synthetic import load_shapes

    row = {}
    truth = shapes = None
    clip = reference / f"{name}.mp4"
    if clip.is_file():
        truth, _ = decode_video(clip.read_bytes())
        if truth.shape[1:3] != video.shape[1:3]:
            truth = np.stack([cv2.resize(f, video.shape[2:0:-1], interpolation=cv2.INTER_AREA) for f in truth])
        n = min(len(video), len(truth))
        row["psnr"] = psnr(video[:n], truth[:n])
    masks = reference / f"{name}.shapes.npy"
    if masks.is_file():
        shapes = load_shapes(masks.read_bytes())
        if shapes.shape[1:] != video.shape[1:3]:
            raise ValueError(f"{masks}: masks {shapes.shape[1:]} are not the video's size {video.shape[1:3]}")
        n = min(len(video), len(shapes))
        row["shape_iou"] = shape_iou(video[:n], shapes[:n])
    if truth is not None and shapes is not None:
        n = min(len(video), len(truth), len(shapes))
        match = colour_match(video[:n], truth[:n], shapes[:n])
        row["colour_match"] = None if math.isnan(match) else match  # metrics.json stays strict JSON
    return row


def score(run: Path, info: dict, tolerance: int, reference: Path | None = None) -> dict:
    from datamodules.metrics import blur_ssim, edge_f1
    from modules.pipeline import load_inputs
    from modules.spec import parse_spec

    # only edge and vis are scored: other controls (maybe from an annotator) are not recomputed
    scored = {k: v for k, v in info["spec"].items() if k not in ("depth", "seg", "keypoint")}
    spec = parse_spec(scored, Path("/"), source=str(run / f"{info['spec']['name']}.json"), require_control=False)
    inputs = load_inputs(spec)
    video = load_generated(run, info)
    n = min(len(video), inputs.frames)
    row = {
        "name": spec.name,
        "nfe": info["nfe"],
        "seconds": info["seconds"]["generate"],
        "denoise_s": info["seconds"].get("denoise"),
        "frames": len(video),
    }
    if "edge" in inputs.controls:
        row["edge_f1"] = edge_f1(
            video[:n], inputs.controls["edge"][:n], tolerance, spec.controls["edge"].preset_edge_threshold
        )
    if "blur" in inputs.controls and inputs.video is not None:
        row["blur_ssim"] = blur_ssim(video[:n], inputs.video[:n], spec.controls["vis"].preset_blur_strength)
    if reference is not None:
        row.update(score_reference(video, spec.name, reference))
    return row


def summarise(label: str, run: Path, rows: list[dict]) -> dict:
    """A run's means over clips (and the standard deviation of each score) of its per-clip rows."""
    summary = {"label": label, "dir": str(run), "videos": len(rows)}
    for key in (*SCORES, "nfe", "seconds", "denoise_s"):
        # None or NaN: the clip has no such score (e.g. colour match of a clip without shapes)
        values = [r[key] for r in rows if r.get(key) is not None and not math.isnan(r[key])]
        if values:
            summary[key] = mean(values)
            if key in SCORES:
                summary[f"{key}_std"] = stdev(values) if len(values) > 1 else 0.0
    return summary


def infer_outputs(run: Path) -> list[dict]:
    """The `<name>.json` records infer wrote in `run`, in name order."""
    infos = []
    for file in sorted(run.glob("*.json")):
        info = json.loads(file.read_text())
        if isinstance(info, dict) and {"spec", "nfe", "seconds"} <= set(info):
            infos.append(info)
    if not infos:
        raise FileNotFoundError(f"{run}: no infer outputs (<name>.json written by vidistill infer)")
    return infos


def score_runs(
    runs: list[Path], labels: list[str], sources: list[str] | None, reference: Path | None, tolerance: int
) -> dict:
    """Every run scored clip by clip (a progress bar per run), summarised, and its speed-up
    against the first run: what metrics.json holds."""
    from tqdm import tqdm

    results = {"runs": [], "tolerance": tolerance}
    for i, (label, run) in enumerate(zip(labels, runs)):
        infos = infer_outputs(run)
        rows = [score(run, info, tolerance, reference) for info in tqdm(infos, desc=f"evaluate {label}", unit="video")]
        summary = summarise(label, run, rows)
        if sources is not None:
            summary["source"] = sources[i]
        results["runs"].append({**summary, "rows": rows})
    ref = results["runs"][0]
    for r in results["runs"]:
        r["speedup"] = ref["seconds"] / r["seconds"]
        if "denoise_s" in r and "denoise_s" in ref:
            r["denoise_speedup"] = ref["denoise_s"] / r["denoise_s"]
    return results


def _fmt(v, digits: int = 3) -> str:
    return "–" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def _mean_std(r: dict, key: str, digits: int = 3) -> str:
    if r.get(key) is None:
        return "–"
    return f"{r[key]:.{digits}f} ± {r[f'{key}_std']:.{digits}f}"


def markdown(results: dict) -> str:
    """The table of means ± standard deviations over clips; shape IoU, colour match and PSNR only
    when some run was scored against ground truth that has them."""
    runs, ref = results["runs"], results["runs"][0]["label"]
    truth = [k for k in ("shape_iou", "colour_match", "psnr") if any(k in r for r in runs)]
    names = {"shape_iou": "shape IoU", "colour_match": "colour match", "psnr": "PSNR (dB)"}
    head = [names[k] for k in truth] + [f"Edge F1 (tol {results['tolerance']} px)", "Blur SSIM"]
    lines = [
        f"| model | videos | {' | '.join(head)} | NFE | seconds | speed-up vs {ref} |",
        "|---|---|" + "---|" * len(head) + "---|---|---|",
    ]
    for r in runs:
        cells = [_mean_std(r, k, 2 if k == "psnr" else 3) for k in (*truth, "edge_f1", "blur_ssim")]
        lines.append(
            f"| {r['label']} | {r['videos']} | {' | '.join(cells)} | "
            f"{_fmt(r.get('nfe'), 1)} | {_fmt(r.get('seconds'), 2)} | {r['speedup']:.2f}x |"
        )
    return "\n".join(lines)


def svg_chart(results: dict) -> str:
    """Grouped bars: shape IoU, colour match, Edge F1 and Blur SSIM per model (0..1), each where
    some run has it; NFE and speed-up as labels."""
    runs = results["runs"]
    metrics = [
        ("shape_iou", "shape IoU", "#2ca25f"),
        ("colour_match", "colour match", "#c2408f"),
        ("edge_f1", "Edge F1", "#3b7dd8"),
        ("blur_ssim", "Blur SSIM", "#e08a2c"),
    ]
    metrics = [m for m in metrics if any(m[0] in r for r in runs)]
    bar, gap, top, plot_h = 28, 44, 30, 180
    group = bar * max(len(metrics), 1) + gap
    # wide enough for the legend too (90 px an entry), which outgrows one or two runs' bars
    width = max(60 + group * len(runs) + 20, 60 + 90 * len(metrics))
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{top + plot_h + 85}" '
        'font-family="sans-serif" font-size="11">'
    ]
    for v in (0.0, 0.5, 1.0):
        y = top + plot_h * (1 - v)
        parts.append(
            f'<line x1="50" x2="{width - 10}" y1="{y}" y2="{y}" stroke="#ddd"/>'
            f'<text x="45" y="{y + 4}" text-anchor="end">{v:.1f}</text>'
        )
    for i, r in enumerate(runs):
        x0 = 60 + i * group
        for j, (key, _, color) in enumerate(metrics):
            v = r.get(key)
            if v is None:
                continue
            h = plot_h * max(0.0, min(1.0, v))
            parts.append(
                f'<rect x="{x0 + j * bar}" y="{top + plot_h - h}" width="{bar - 4}" height="{h}" fill="{color}">'
                f"<title>{key} {v:.3f}</title></rect>"
                f'<text x="{x0 + j * bar + bar / 2 - 2}" y="{top + plot_h - h - 3}" text-anchor="middle">{v:.2f}</text>'
            )
        cx = x0 + (group - gap) / 2
        # labels such as "DMD2 student (4 steps)" are wider than a bar group: the part in
        # parentheses goes on a second line
        name, _, detail = html.escape(r["label"]).partition(" (")
        lines = [
            (name, ' font-weight="bold"'),
            (f"({detail}" if detail else "", ""),
            (f"NFE {r.get('nfe', 0):.0f}", ""),
            (f"{r['speedup']:.1f}x faster", ""),
        ]
        parts += [
            f'<text x="{cx}" y="{top + plot_h + 16 + 14 * k}" text-anchor="middle"{style}>{text}</text>'
            for k, (text, style) in enumerate(lines)
            if text
        ]
    for j, (_, name, color) in enumerate(metrics):
        parts.append(
            f'<rect x="{60 + j * 90}" y="8" width="10" height="10" fill="{color}"/>'
            f'<text x="{74 + j * 90}" y="17">{name}</text>'
        )
    parts.append("</svg>")
    return "\n".join(parts)
