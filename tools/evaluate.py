"""`vidistill evaluate`: control fidelity, NFE and wall time of `vidistill infer` outputs.

    vidistill evaluate outputs/teacher outputs/kd outputs/dmd2 --out eval

Each argument is an infer output directory (one model). For every generated spec it recomputes
the controls the way infer made them (the resolved spec in `<name>.json`) and scores the video
against them: Edge F1 for an edge control, Blur SSIM against the input video for a vis (blur)
control. Writes OUT/metrics.json, OUT/metrics.md and OUT/metrics.svg (a bar chart, no plotting
package needed) and prints the markdown table.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from statistics import mean

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


def score(run: Path, info: dict, tolerance: int) -> dict:
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
    return row


def evaluate(runs: list[str], *, out: str = "eval", labels: list[str] | None = None, tolerance: int = 1) -> dict:
    """Score infer output directories; the first is the reference for the speed-up column.

    Args:
        runs: infer output directories (e.g. teacher, KD student, DMD2 student).
        out: where metrics.json, metrics.md and metrics.svg go.
        labels: a name per run (default: the directory names).
        tolerance: Edge F1 pixel tolerance.
    """
    from tqdm import tqdm

    labels = labels or [Path(r).name for r in runs]
    if len(labels) != len(runs):
        raise ValueError(f"{len(labels)} labels for {len(runs)} runs")
    results = {"runs": [], "tolerance": tolerance}
    for label, run in zip(labels, runs):
        run = Path(run)
        infos = []
        for file in sorted(run.glob("*.json")):
            info = json.loads(file.read_text())
            if isinstance(info, dict) and {"spec", "nfe", "seconds"} <= set(info):
                infos.append(info)
        if not infos:
            raise FileNotFoundError(f"{run}: no infer outputs (<name>.json written by vidistill infer)")
        rows = [score(run, info, tolerance) for info in tqdm(infos, desc=f"evaluate {label}", unit="video")]
        summary = {"label": label, "dir": str(run), "videos": len(rows)}
        for key in ("edge_f1", "blur_ssim", "nfe", "seconds", "denoise_s"):
            values = [r[key] for r in rows if r.get(key) is not None]
            if values:
                summary[key] = mean(values)
        results["runs"].append({**summary, "rows": rows})
    ref = results["runs"][0]
    for r in results["runs"]:
        r["speedup"] = ref["seconds"] / r["seconds"]
        if "denoise_s" in r and "denoise_s" in ref:
            r["denoise_speedup"] = ref["denoise_s"] / r["denoise_s"]
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "metrics.json").write_text(json.dumps(results, indent=2))
    table = markdown(results)
    (Path(out) / "metrics.md").write_text(table + "\n")
    (Path(out) / "metrics.svg").write_text(svg_chart(results))
    print(table)
    return results


def _fmt(v, digits: int = 3) -> str:
    return "–" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def markdown(results: dict) -> str:
    ref = results["runs"][0]["label"]
    lines = [
        f"| model | videos | Edge F1 (tol {results['tolerance']} px) | Blur SSIM | NFE | seconds | speed-up vs {ref} |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results["runs"]:
        lines.append(
            f"| {r['label']} | {r['videos']} | {_fmt(r.get('edge_f1'))} | {_fmt(r.get('blur_ssim'))} | "
            f"{_fmt(r.get('nfe'), 1)} | {_fmt(r.get('seconds'), 2)} | {r['speedup']:.2f}x |"
        )
    return "\n".join(lines)


def svg_chart(results: dict) -> str:
    """Grouped bars: Edge F1 and Blur SSIM per model (0..1), with NFE and speed-up as labels."""
    runs = results["runs"]
    metrics = [("edge_f1", "Edge F1", "#3b7dd8"), ("blur_ssim", "Blur SSIM", "#e08a2c")]
    metrics = [m for m in metrics if any(m[0] in r for r in runs)]
    bar, gap, top, plot_h = 28, 44, 30, 180
    group = bar * max(len(metrics), 1) + gap
    width = 60 + group * len(runs) + 20
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
