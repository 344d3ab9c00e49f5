"""The control-training step and the inference forward of a network, measured per shape: our
network (`Ours`) for `--mode net` and as `--mode dmd2`'s reference step, or `--mode net`'s peer.

The training step runs base + control forward, an MSE loss, backward and AdamW on the control
branch (base frozen); the inference forward is base + control without gradients.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from modules.denoiser import Cond, Denoiser
from modules.nets import forward_flops, set_backend
from modules.nets.dit import set_sparse
from modules.parallel import set_checkpointing, set_compile
from tools.bench.common import (
    TEXT_TOKENS,
    Variant,
    free,
    make_inputs,
    out_of_memory,
    parse_sparse,
    profile_table,
    timed_peak,
)


class Ours:
    name = "vidistill"

    def __init__(self, cfg, device, dtype, variant: Variant):
        self.model = Denoiser.build(cfg, device=device, dtype=dtype)
        self.model.net.requires_grad_(False)
        self.params = list(self.model.controls.parameters())
        self.configure(variant)

    def configure(self, variant: Variant) -> None:
        # the training stages' own switches, so the bench measures what a recipe would run
        set_checkpointing(self.model, variant.checkpointing)
        set_compile(self.model, variant.compile)
        set_backend(variant.attention_backend)
        self.sparse = parse_sparse(variant.sparse)
        set_sparse(self.model, self.sparse)
        self.variant = variant.label()
        self.compiled = variant.compile

    def forward(self, x):
        cond = Cond(text=x["text"], controls={"edge": x["ctrl"]}, padding_mask=x["pad"])
        return self.model.velocity(x["x"], x["t"], cond)


def measure(impl, cfg, grids, device, steps, peak_tflops, infer=True, profile: str | None = None) -> list[dict]:
    """One row per shape; a shape that runs out of GPU memory gives a row with `error` and the
    next measurement goes on. `profile`: a folder for a profile of the last shape's training step."""
    opt = torch.optim.AdamW(impl.params, lr=1e-5)
    last = list(grids)[-1]
    rows = []
    for shape, grid in grids.items():
        try:
            where = profile if shape == last else None
            rows.append(measure_shape(impl, opt, cfg, shape, grid, device, steps, peak_tflops, infer, where))
        except torch.OutOfMemoryError as e:
            opt.zero_grad(set_to_none=True)
            rows.append(error_row(impl, shape, out_of_memory(e)))
            print(json.dumps(rows[-1]), flush=True)
        free(device)
    return rows


def error_row(impl, shape: str, error: str) -> dict:
    return dict(
        impl=impl.name,
        variant=impl.variant,
        compiled=impl.compiled,
        shape=shape,
        error=error,
        train_step_s=None,
        train_peak_GiB=None,
        train_mfu=None,
        infer_fwd_s=None,
        infer_peak_GiB=None,
        infer_mfu=None,
    )


def measure_shape(impl, opt, cfg, shape, grid, device, steps, peak_tflops, infer, profile) -> dict:
    x = make_inputs(cfg, grid, device, next(iter(impl.params)).dtype)
    tokens = grid[0] * (grid[1] // cfg.dit.patch[1]) * (grid[2] // cfg.dit.patch[2])

    def train_step():
        loss = F.mse_loss(impl.forward(x).float(), x["target"].float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def infer_fwd():
        impl.forward(x)

    train_s, train_mem = timed_peak(train_step, steps, device)
    infer_s, infer_mem = timed_peak(infer_fwd, steps, device) if infer else (None, None)
    sparse = impl.sparse
    attended = (
        sparse.kept_fraction((grid[0], grid[1] // cfg.dit.patch[1], grid[2] // cfg.dit.patch[2])) if sparse else 1
    )
    flops = forward_flops(cfg.dit.dim, tokens, cfg.dit.depth + cfg.control.blocks, TEXT_TOKENS, attended)

    def mfu(f: float, sec: float | None) -> float | None:
        return round(f / sec / (peak_tflops * 1e12), 3) if device.type == "cuda" and sec else None

    row = dict(
        impl=impl.name,
        variant=impl.variant,
        compiled=impl.compiled,
        shape=shape,
        tokens=tokens,
        train_step_s=round(train_s, 3),
        train_peak_GiB=train_mem and round(train_mem, 1),
        train_mfu=mfu(3 * flops, train_s),
        infer_fwd_s=infer_s and round(infer_s, 3),
        infer_peak_GiB=infer_mem and round(infer_mem, 1),
        infer_mfu=mfu(flops, infer_s),
    )
    print(json.dumps(row), flush=True)
    if profile:
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{impl.name}_{shape}_{impl.variant}").strip("_")
        write_profile(train_step, device, Path(profile) / f"{name}.txt", row)
    return row


def write_profile(step: Callable[[], None], device: torch.device, path: Path, row: dict, top: int = 30) -> None:
    """One training step under torch.profiler: the `top` kernels/ops by self device time, to `path` and stdout."""
    table = profile_table(step, device, top)
    text = f"# {row['impl']} {row['variant']} {row['shape']}: one training step\n{table}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(text, flush=True)
