"""The one table of dtype names a recipe, a config file or a command line may use."""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def to_dtype(value: str | torch.dtype | None, what: str = "dtype", allow_none: bool = False) -> torch.dtype | None:
    """`value` as a torch dtype: a name of DTYPES, "torch.<name>" or a dtype itself. None (or "none")
    is passed through where `allow_none`, meaning "keep what is there"."""
    if isinstance(value, torch.dtype):
        return value
    if allow_none and value in (None, "none"):
        return None
    name = str(value).removeprefix("torch.")
    if name not in DTYPES:
        choices = ", ".join(DTYPES) + (", none" if allow_none else "")
        raise ValueError(f"{what} must be one of {choices}, got {value!r}")
    return DTYPES[name]
