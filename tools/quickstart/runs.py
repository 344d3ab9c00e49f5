"""Where the quickstart's stages put things, relative to OUT (the recipes' relative paths resolve
there), and the models it compares: shared by the stages that write them and the report that
reads them."""

from __future__ import annotations

from pathlib import Path

RUNS = Path("runs/quickstart")
DATA = RUNS / "data"  # the synthetic shards: train/ and val/
SPECS = RUNS / "specs"  # held-out specs (edge.jsonl, edge_vis.jsonl) and their clips (videos/)
OUTPUTS = RUNS / "out"  # infer's outputs, one folder per compared model
EVAL = RUNS / "eval"  # evaluate's metrics.json, metrics.md and metrics.svg
TRAINED = ("base", "edge", "blur", "kd", "dmd2")  # the training stages, each under RUNS/<stage>

# (output folder, label, model, extra infer arguments) in the report's order; the first is the reference
RUNS_TO_COMPARE = [
    ("teacher", "teacher (35 steps)", RUNS / "edge/export", ["--input", "edge.jsonl"]),
    # the specs ask 35 steps (the teacher's); a student is told its own count
    ("kd", "KD student (4 steps)", RUNS / "kd/export", ["--input", "edge.jsonl", "--num-steps", 4]),
    (
        "dmd2",
        "DMD2 student (4 steps)",
        RUNS / "dmd2/consolidated/student",
        ["--input", "edge.jsonl", "--num-steps", 4],
    ),
    (
        "dmd2_1step",
        "DMD2 student (1 step)",
        RUNS / "dmd2/consolidated/student",
        ["--input", "edge.jsonl", "--num-steps", 1],
    ),
    ("teacher_edge_vis", "teacher, edge + vis (35 steps)", RUNS / "teacher_edge_vis", ["--input", "edge_vis.jsonl"]),
]
