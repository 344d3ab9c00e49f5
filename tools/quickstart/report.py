"""The quickstart's `report.html`: side-by-side videos, loss curves per stage, the metrics table.

Self-contained but for its media: OUT/report/<spec>.webm (VP8, plays in browsers) holds, per
held-out spec, the input clip, its edge control and every compared model's video side by side;
charts are inline SVG (no plotting package).
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np

from .runs import EVAL, OUTPUTS, RUNS, RUNS_TO_COMPARE, SPECS, TRAINED

SCALE = 3  # the quickstart's 48x64 clips, enlarged (nearest neighbour) to be seen
GAP = 4


def scalars(stage_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """train/* loss curves of a stage from its TensorBoard logs (all versions: a resumed run adds
    one); counters such as train/nonfinite_skipped are left out (they belong in TensorBoard)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    curves: dict[str, dict[int, float]] = {}
    for events in sorted(stage_dir.glob("tb/version_*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            if tag.startswith("train/") and tag != "train/nonfinite_skipped":
                curves.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return {tag: sorted(points.items()) for tag, points in curves.items()}


def line_chart(title: str, curves: dict[str, list[tuple[int, float]]], width: int = 340, height: int = 200) -> str:
    """Inline SVG: one polyline per curve, log-scaled y when the values span over a decade."""
    colors = ["#3b7dd8", "#e08a2c", "#3aa35b", "#c0392b", "#8e44ad"]
    points = [v for c in curves.values() for _, v in c]
    if not points:
        return f"<p>{html.escape(title)}: no logged losses</p>"
    steps = [s for c in curves.values() for s, _ in c]
    log = min(points) > 0 and max(points) / min(points) > 10
    f = (lambda v: np.log10(v)) if log else (lambda v: v)
    lo, hi = f(min(points)), f(max(points))
    hi = hi if hi > lo else lo + 1
    s0, s1 = min(steps), max(max(steps), min(steps) + 1)
    left, top, w, h = 44, 22, width - 54, height - 64  # below the plot: step labels, a 2-column legend

    def x(s):
        return left + w * (s - s0) / (s1 - s0)

    def y(v):
        return top + h * (1 - (f(v) - lo) / (hi - lo))

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-size="10" '
        f'font-family="sans-serif"><text x="{left}" y="13" font-weight="bold">{html.escape(title)}</text>',
        f'<rect x="{left}" y="{top}" width="{w}" height="{h}" fill="none" stroke="#ccc"/>',
    ]
    for v, anchor in ((max(points), top + 4), (min(points), top + h)):
        parts.append(f'<text x="{left - 3}" y="{anchor}" text-anchor="end">{v:.3g}</text>')
    parts.append(
        f'<text x="{left}" y="{top + h + 12}">{s0}</text>'
        f'<text x="{left + w}" y="{top + h + 12}" text-anchor="end">step {s1}</text>'
    )
    for i, (tag, c) in enumerate(curves.items()):
        color = colors[i % len(colors)]
        path = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in c)
        parts.append(
            f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.5"/>'
            f'<text x="{left + 4 + (i % 2) * 150}" y="{top + h + 26 + (i // 2) * 12}" fill="{color}">'
            f"{html.escape(tag.removeprefix('train/'))}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def _frames(run: Path, name: str) -> np.ndarray | None:
    from datamodules.codec import decode_video

    for suffix in (".mkv", ".mp4"):
        if (run / f"{name}{suffix}").is_file():
            return decode_video((run / f"{name}{suffix}").read_bytes())[0]
    return None


def comparison_video(panels: list[np.ndarray], frames: int) -> np.ndarray:
    """Panels (T, H, W, 3) side by side, each enlarged SCALE x, GAP white pixels apart."""
    tiles = []
    for p in panels:
        p = np.asarray(p[:frames])
        if len(p) < frames:  # a shorter clip holds its last frame
            p = np.concatenate([p, np.repeat(p[-1:], frames - len(p), axis=0)])
        tiles.append(p.repeat(SCALE, axis=1).repeat(SCALE, axis=2))
        tiles.append(np.full((frames, tiles[-1].shape[1], GAP, 3), 255, np.uint8))
    return np.concatenate(tiles[:-1], axis=2)


def comparison_videos(out: Path, specs: list[dict]) -> list[tuple[str, str, str, int, int]]:
    """OUT/report/<spec>.webm per spec whose input and every compared output decode: the input, its
    edge control and each model's video side by side. Returns (name, prompt, media path, width,
    height) of each."""
    from datamodules.codec import write_video
    from datamodules.controls import edge

    media = out / "report"
    media.mkdir(exist_ok=True)
    rows = []
    for spec in specs:
        name, frames = spec["name"], spec["max_frames"]
        source = _frames(out / SPECS / "videos", name)
        generated = [_frames(out / OUTPUTS / folder, name) for folder, *_ in RUNS_TO_COMPARE]
        if source is None or any(g is None for g in generated):
            continue
        video = comparison_video([source, edge(source[:frames])] + generated, frames)
        write_video(media / f"{name}.webm", video, 4.0, "vp8")
        rows.append((name, spec["prompt"], f"report/{name}.webm", video.shape[2], video.shape[1]))
    return rows


def metrics_table(metrics: dict) -> str:
    """The metrics table's rows: per compared model, where it came from, its quality against
    ground truth and against its control (means ± standard deviations over the held-out clips),
    NFE, time and speed-up."""

    def cell(r: dict, key: str, digits: int = 3) -> str:
        if r.get(key) is None:
            return "–"
        spread = f" ± {r[f'{key}_std']:.{digits}f}" if f"{key}_std" in r else ""
        return f"{r[key]:.{digits}f}{spread}"

    table = [
        "<tr><th>model</th><th>where it came from</th><th>shape IoU</th><th>colour match</th><th>PSNR (dB)</th>"
        "<th>Edge F1 (1 px)</th><th>Blur SSIM</th><th>NFE</th><th>s / video</th>"
        f"<th>speed-up vs {html.escape(metrics['runs'][0]['label'])}</th></tr>"
    ]
    for r in metrics["runs"]:
        table.append(
            f"<tr><td>{html.escape(r['label'])}</td><td>{html.escape(r.get('source', ''))}</td>"
            f"<td>{cell(r, 'shape_iou')}</td><td>{cell(r, 'colour_match')}</td><td>{cell(r, 'psnr', 2)}</td>"
            f"<td>{cell(r, 'edge_f1')}</td>"
            f"<td>{cell(r, 'blur_ssim')}</td><td>{r.get('nfe', 0):.0f}</td>"
            f"<td>{r.get('seconds', 0):.2f}</td><td>{r['speedup']:.2f}x</td></tr>"
        )
    return "".join(table)


def write_report(out: Path) -> Path:
    """OUT/report.html from a quickstart directory (stage times, runs, eval)."""
    out = Path(out)
    state = json.loads((out / "quickstart.json").read_text())
    metrics = json.loads((out / EVAL / "metrics.json").read_text())
    specs = [json.loads(line) for line in (out / SPECS / "edge.jsonl").read_text().splitlines() if line.strip()]
    labels = ["input", "edge control"] + [label for _, label, *_ in RUNS_TO_COMPARE]
    rows = comparison_videos(out, specs[:4])
    stages = "".join(f"<tr><td>{html.escape(k)}</td><td>{v / 60:.1f} min</td></tr>" for k, v in state["stages"].items())
    charts = "".join(
        line_chart(stage, scalars(out / RUNS / stage)) for stage in TRAINED if (out / RUNS / stage / "tb").is_dir()
    )
    videos = "".join(
        f"<figure><figcaption>{html.escape(name)}: “{html.escape(prompt)}”</figcaption>"
        f'<div class="labels" style="width:{w}px">'
        + "".join(f"<span>{html.escape(lab)}</span>" for lab in labels)
        + f'</div><video src="{src}" width="{w}" height="{h}" autoplay loop muted playsinline></video></figure>'
        for name, prompt, src, w, h in rows
    )
    table = metrics_table(metrics)
    teacher = next((r.get("source", "") for r in metrics["runs"] if r["label"].startswith("teacher (")), "")
    chart = (out / EVAL / "metrics.svg").read_text() if (out / EVAL / "metrics.svg").is_file() else ""
    total = sum(state["stages"].values())
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>vidistill quickstart report</title>
<style>
body {{ font-family: sans-serif; margin: 24px; color: #222; max-width: 1400px; }}
table {{ border-collapse: collapse; margin: 8px 0 20px; }}
td, th {{ border: 1px solid #ccc; padding: 4px 10px; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
figure {{ margin: 0 0 18px; }} figcaption {{ font-size: 13px; margin-bottom: 4px; }}
.labels {{ display: flex; font-size: 11px; color: #555; }} .labels span {{ flex: 1; text-align: center; }}
video {{ image-rendering: pixelated; display: block; }} .charts svg {{ margin-right: 12px; }}
</style></head><body>
<h1>vidistill quickstart</h1>
<p>The teacher distilled here: {html.escape(teacher)}. A blur control branch trained on its frozen base,
the teacher's trajectories (KD data), a 4-step student warmed up on them (KD) and distilled with DMD2,
then every model run by <code>vidistill infer</code> on {len(specs)} held-out clips and scored by
<code>vidistill evaluate</code> against the clips' ground truth (shape IoU against the shapes the
generator drew; colour match, the share of those shapes' pixels drawn bright in the colour the
caption names, read off the clip; PSNR against the clip) and against the edge control (Edge F1). The control-free base
is the teacher with its edge branch at weight 0: the same prompts and seeds without the control.
Seed {state.get("seed", 0)}; budget: <code>{html.escape(json.dumps(state["budget"]))}</code>;
device {html.escape(state["device"])} ({html.escape(state["machine"])}).</p>
<h2>Videos</h2>
<p>Per held-out clip: the input, its edge control, then each model's video ({SCALE}x enlarged, looped).</p>
{videos}
<h2>Control fidelity and speed</h2>
<table>{table}</table>
{chart}
<h2>Training</h2>
<div class="charts">{charts}</div>
<h2>Stages</h2>
<table><tr><th>stage</th><th>time</th></tr>{stages}<tr><th>total</th><th>{total / 60:.1f} min</th></tr></table>
</body></html>
"""
    path = out / "report.html"
    path.write_text(page)
    return path
