"""`vidistill evaluate`: control fidelity, NFE and wall time of `vidistill infer` outputs.

    vidistill evaluate outputs/teacher outputs/kd outputs/dmd2 --out eval

    vidistill evaluate outputs/teacher outputs/dmd2 --reference specs/videos --out eval

Each argument is an infer output directory (one model); the scoring is modules/evaluation.py.
For every generated spec it recomputes the controls the way infer made them (the resolved spec in
`<name>.json`) and scores the video against them: Edge F1 for an edge control, Blur SSIM against
the input video for a vis (blur) control. With `--reference DIR`, clips that have ground truth
there are also scored against it: PSNR against `DIR/<name>.mp4`, shape IoU against
`DIR/<name>.shapes.npy` (make-specs writes both for synthetic clips) and, where both exist,
colour match: the share of the shapes' pixels the video draws bright in the palette colour of the
clip's pixel there (the caption's colour of that shape). Every measure is averaged
over clips, with its standard deviation beside it. Writes OUT/metrics.json, OUT/metrics.md and
OUT/metrics.svg (a bar chart, no plotting package needed) and prints the markdown table.
"""

from __future__ import annotations

import json
from pathlib import Path


def evaluate(
    runs: list[str],
    *,
    out: str = "eval",
    labels: list[str] | None = None,
    sources: list[str] | None = None,
    reference: str | None = None,
    tolerance: int = 1,
) -> dict:
    """Score infer output directories; the first is the reference for the speed-up column.

    Args:
        runs: infer output directories (e.g. teacher, KD student, DMD2 student).
        out: where metrics.json, metrics.md and metrics.svg go.
        labels: a name per run (default: the directory names).
        sources: where each run's model came from, written beside its scores (e.g. "shipped",
            "trained in this run: 50 steps").
        reference: folder of ground truth per spec name: <name>.mp4 (PSNR) and <name>.shapes.npy
            (shape IoU; with the .mp4, colour match); clips without a file there are scored
            without it.
        tolerance: Edge F1 pixel tolerance.

    Returns the metrics (what metrics.json holds).
    """
    from modules.evaluation import markdown, score_runs, svg_chart

    labels = labels or [Path(r).name for r in runs]
    if len(labels) != len(runs) or (sources is not None and len(sources) != len(runs)):
        raise ValueError(f"{len(labels)} labels and {len(sources or runs)} sources for {len(runs)} runs")
    ref_dir = Path(reference) if reference else None
    if ref_dir is not None and not ref_dir.is_dir():
        raise FileNotFoundError(f"--reference {reference}: no such folder")
    results = score_runs([Path(r) for r in runs], labels, sources, ref_dir, tolerance)
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "metrics.json").write_text(json.dumps(results, indent=2))
    table = markdown(results)
    (Path(out) / "metrics.md").write_text(table + "\n")
    (Path(out) / "metrics.svg").write_text(svg_chart(results))
    print(table)
    return results
