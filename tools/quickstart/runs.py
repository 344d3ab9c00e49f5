"""Where the quickstart's stages put things, relative to OUT (the recipes' relative paths resolve
there), and the models it compares: shared by the stages that write them and the report that
reads them."""

from __future__ import annotations

from pathlib import Path

RUNS = Path("runs/quickstart")
DATA = RUNS / "data"  # the synthetic shards: train/ and val/
SPECS = RUNS / "specs"  # held-out specs (*.jsonl) and their clips and shape masks (videos/)
OUTPUTS = RUNS / "out"  # infer's outputs, one folder per compared model
EVAL = RUNS / "eval"  # evaluate's metrics.json, metrics.md and metrics.svg
# the training stages, each under RUNS/<stage>
TRAINED = ("base", "edge", "blur", "kd", "dmd2", "kd_sparse", "dmd2_sparse")
# the shipped network the base and edge stages are replaced by: the edge teacher (base + edge branch)
SHIPPED = {"edge": "quickstart-edge"}

# (output folder, label, model, spec file, extra infer arguments) in the report's order; the first
# row is the reference of the speed-up column. The control-free base is the teacher with its edge
# branch at weight 0: the same network, seeds and prompts, the control's residual times 0.
RUNS_TO_COMPARE = [
    ("base", "control-free base (35 steps)", RUNS / "edge/export", "edge_off.jsonl", []),
    ("teacher", "teacher (35 steps)", RUNS / "edge/export", "edge.jsonl", []),
    # the specs ask 35 steps (the teacher's); a student is told its own count
    ("kd", "KD student (4 steps)", RUNS / "kd/export", "edge.jsonl", ["--num-steps", 4]),
    ("dmd2", "DMD2 student (4 steps)", RUNS / "dmd2/consolidated/student", "edge.jsonl", ["--num-steps", 4]),
    ("dmd2_1step", "DMD2 student (1 step)", RUNS / "dmd2/consolidated/student", "edge.jsonl", ["--num-steps", 1]),
    ("teacher_edge_vis", "teacher, edge + vis (35 steps)", RUNS / "teacher_edge_vis", "edge_vis.jsonl", []),
    (
        "dmd2_sparse",
        "DMD2 student, sparse attention (4 steps)",
        RUNS / "dmd2_sparse/consolidated/student",
        "edge.jsonl",
        ["--num-steps", 4],
    ),
]
# the sparse student's attention (recipes/quickstart/kd_sparse.yaml), as the report says it
SPARSE_SOURCE = "top-k tiles: 8 of 24 key tiles of 1x4x4 tokens per query tile, 1/3 of the keys"
# the spec files make-specs writes: (file, controls, control weight)
SPEC_FILES = [("edge.jsonl", "edge", 1.0), ("edge_off.jsonl", "edge", 0.0), ("edge_vis.jsonl", "edge,vis", 1.0)]
