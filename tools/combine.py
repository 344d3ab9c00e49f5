"""`vidistill combine`: a base and its control branches -> one teacher Denoiser directory, and back.

Control training writes (export / consolidate) a Denoiser directory holding its frozen base and the
trained branch; bases and branches are trained, versioned and shipped separately, so a teacher is
put together from a base plus one or more branches, and split into them again:

    combine BASE --control CTRL [--control+ CTRL2] --out TEACHER   # TEACHER: base + every branch
    combine TEACHER --split true --out PARTS                       # PARTS/base, PARTS/control_<m>

What the parts hold and how they are checked against each other is modules/combine.py's; this
file is the command line.
"""

from __future__ import annotations


def combine(
    base: str, *, out: str, control: list[str] | str | None = None, split: bool = False, dtype: str | None = None
) -> None:
    """Put a teacher together from a base and control branches, or split a teacher into them.

    Args:
        base: the base Denoiser directory (with --split: the teacher to split).
        out: output directory: the combined teacher, or with --split the parts' parent
            (OUT/base, OUT/control_<modality>).
        control: control branch directories (a split's control_<m>, or a full network directory from
            control training, of which only controls.* is taken); several: --control+ A --control+ B.
        split: split BASE into OUT/base and one OUT/control_<modality> per branch.
        dtype: cast floating tensors to bf16, fp16 or fp32 (needed when the parts' dtypes differ).
    """
    from modules import combine as parts
    from modules.dtypes import to_dtype

    cast = None if dtype is None else to_dtype(dtype, "--dtype")
    controls = [control] if isinstance(control, str) else list(control or [])
    if split:
        if controls:
            raise ValueError("--split takes one teacher directory and no --control")
        print(f"wrote {', '.join(map(str, parts.split(base, out, cast)))}")
        return
    if not controls:
        raise ValueError("give the control branch(es) with --control DIR (or --split true to split BASE)")
    cfg = parts.join(base, controls, out, cast)
    print(f"wrote {out}: base {base} + control branch(es) {cfg.modalities}")
