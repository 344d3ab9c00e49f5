"""`vidistill consolidate`: a sharded (DCP) training checkpoint -> one Denoiser directory per network.

What a checkpoint directory holds, how its networks, EMA and GAN heads are found and how their
configs are recovered is modules/checkpoint.py's (Checkpoint, export); this file is the command line.
"""

from __future__ import annotations

from pathlib import Path


def consolidate(
    ckpt: str, *, out: str, networks: list[str] | None = None, dtype: str | None = None, overwrite: bool = False
) -> None:
    """Export the networks of a sharded training checkpoint as Denoiser directories.

    Writes OUT/<network>/ (config.json + model.safetensors, loadable with Denoiser.from_pretrained)
    for each chosen network (model, student, teacher, fake_score, ...) and OUT/ema/ (the trained
    network with its EMA weights) when the checkpoint keeps an EMA. Runs on CPU without a process
    group; reads only the chosen networks' tensors (never the optimizer state), one network at a time.

    Args:
        ckpt: checkpoint directory of a sharded run (holding .metadata and __<rank>_0.distcp files).
        out: output directory; one sub-directory per network.
        networks: networks to export (default: all, plus ema when present).
        dtype: cast floating tensors to bf16, fp16 or fp32 (default: as stored).
        overwrite: replace an OUT that holds files (refused otherwise). OUT is written under a
            temporary name and renamed when every network is written.
    """
    from tqdm import tqdm

    from datamodules.files import written
    from modules.checkpoint import Checkpoint, export
    from modules.dtypes import to_dtype

    target = Path(out)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"--out {target} is a file; consolidate writes a directory there")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"--out {target} already holds files; pass --overwrite true to replace them")
    cast = None if dtype is None else to_dtype(dtype, "--dtype")
    source = Checkpoint(ckpt)
    chosen = source.choose(networks)
    step = source.meta.get("global_step")
    bar = tqdm(chosen, desc="consolidate", unit="network", disable=len(chosen) < 2 or None)
    with written(target) as tmp:
        for name in bar:
            bar.set_postfix_str(name)
            done = export(source, name, tmp / name, cast)
            tqdm.write(
                f"{target / name}: {done.tensors} tensors, {done.nbytes / 2**20:.1f} MiB"
                + (f" (EMA of {done.ema_of})" if done.ema_of else "")
                + (f", step {step}" if step is not None else "")
            )
