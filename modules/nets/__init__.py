"""Network code: plain torch, no Lightning, no training logic."""

from .attention import attention, set_backend
from .control_branch import ControlBranch, ControlConfig, mix_residuals
from .dit import PEAK_TFLOPS, DiT, DiTConfig, forward_flops
from .presets import PRESETS, NetConfig, preset
from .sparse import SparseAttention

__all__ = [
    "attention",
    "set_backend",
    "ControlBranch",
    "ControlConfig",
    "mix_residuals",
    "DiT",
    "DiTConfig",
    "forward_flops",
    "PEAK_TFLOPS",
    "PRESETS",
    "NetConfig",
    "preset",
    "SparseAttention",
]
