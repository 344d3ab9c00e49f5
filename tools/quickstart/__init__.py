"""`vidistill quickstart`: the whole pipeline on the embedded default, then `report.html`.

    vidistill quickstart --out quickstart

synthetic shards -> base -> edge and blur control branches -> KD data -> KD warmup -> DMD2 (4-step
student) -> consolidation -> held-out specs -> inference (teacher 35 steps; KD student 4 steps; DMD2
student 4 and 1 steps; an edge + vis teacher) -> evaluation -> report. Every stage is the
subcommand a cluster user runs (a training run in a child process) with the quickstart recipe
(recipes/quickstart/*.yaml) and only the budget changed (steps, clip counts), written to
OUT/configs/<stage>.yaml so nothing is hidden. Everything lands under OUT (the recipes' relative
paths resolve there). A rerun skips finished stages and resumes an interrupted training stage from
its latest checkpoint (saved every 50 steps and at least twice per stage). `--device cuda` on a
machine without CUDA is refused before anything is written.

Parts: `stages` (the budgets, the stages and `quickstart` itself), `runs` (where each stage's
output lands and the models compared, read by both the stages and the report), `report` (the
report.html page).
"""

from __future__ import annotations

from .runs import RUNS, RUNS_TO_COMPARE
from .stages import BUDGETS, Budget, quickstart, training_config

__all__ = ["BUDGETS", "RUNS", "RUNS_TO_COMPARE", "Budget", "quickstart", "training_config"]
