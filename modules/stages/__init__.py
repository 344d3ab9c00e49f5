"""The training stages, LightningModules on one base (`base.Stage`): control training, the KD
warmup and DMD2. Recipes name them as `modules.stages.ControlTraining` etc."""

import sys

from . import control_training, dmd2, kd_warmup
from .base import NetSpec, OptimSpec, Stage, StageOptions, TextSpec, TokenizerSpec
from .control_training import ControlTraining, TimeSpec
from .dmd2 import DMD2, CriticTime, GANSpec
from .kd_warmup import KDWarmup

# the stages' module paths before they moved here, which older recipes and saved LightningCLI
# configs name (modules.control.ControlTraining, modules.kd.KDWarmup, modules.dmd2.DMD2)
for _old, _new in (("control", control_training), ("kd", kd_warmup), ("dmd2", dmd2)):
    sys.modules.setdefault(f"modules.{_old}", _new)

__all__ = [
    "DMD2",
    "ControlTraining",
    "CriticTime",
    "GANSpec",
    "KDWarmup",
    "NetSpec",
    "OptimSpec",
    "Stage",
    "StageOptions",
    "TextSpec",
    "TimeSpec",
    "TokenizerSpec",
]
