"""Wan2.1 VAE decode at 720p x 93 frames, bf16, one GPU: as diffusers ships it, channels-last, and
channels-last + compiled (docs/benchmarks.md, "The decode lever").

    python3 recipes/bench/decode_probe.py OUT_DIR        (SMALL=1: a tiny VAE on CPU, to try it)

Each variant is a copy of one randomly initialised full-size AutoencoderKLWan (weights do not
change the time), decodes the same latents once to warm up (compile happens there) and once
timed, and is compared with the default's output. Writes OUT_DIR/decode_probe.json and the top
CUDA kernels of one decode without and with channels-last to OUT_DIR/decode_profile.txt.
"""

import copy
import json
import os
import sys
import time

import torch
from diffusers import AutoencoderKLWan
from torch.profiler import ProfilerActivity, profile

SMALL = bool(os.environ.get("SMALL"))
CL = torch.channels_last_3d


def main(out_dir: str) -> None:
    torch.set_grad_enabled(False)
    dev, dt = torch.device("cpu" if SMALL else "cuda"), torch.bfloat16
    sync = (lambda: None) if SMALL else torch.cuda.synchronize
    torch.manual_seed(0)
    small = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1)
    base = AutoencoderKLWan(**(small if SMALL else {})).to(dev, dt).eval()
    z = torch.randn(1, 16, *((3, 4, 4) if SMALL else (24, 90, 160)), device=dev, dtype=dt)  # 93 x 720 x 1280

    def variant(channels_last: bool = False, compile: bool = False):
        vae = copy.deepcopy(base)
        if channels_last:  # as WanTokenizer(channels_last=True): the 5-D weights only
            for m in vae.modules():
                if isinstance(m, torch.nn.Conv3d):
                    m.to(memory_format=CL)
        if compile:
            vae.decoder.compile()
        zz = z.contiguous(memory_format=CL) if channels_last else z
        return lambda: vae.decode(zz, return_dict=False)[0]

    def seconds(fn):
        sync()
        t0 = time.perf_counter()
        y = fn()
        sync()
        return time.perf_counter() - t0, y

    # as WanTokenizer(compile=True) sets for its decode: one compiled version per channel count
    # and cache state would otherwise exceed torch's default of 8 per function
    torch._dynamo.config.recompile_limit = 64
    rows, profiles, ref = [], [], None
    for name, kw in [
        ("default", {}),
        ("channels_last_3d", dict(channels_last=True)),
        ("channels_last_3d+compile", dict(channels_last=True, compile=True)),
        ("compile", dict(compile=True)),
    ]:
        torch._dynamo.reset()
        try:
            fn = variant(**kw)
            if not SMALL:
                torch.cuda.reset_peak_memory_stats()
            first, _ = seconds(fn)
            s, y = seconds(fn)
            y = y.float()
            ref = y if ref is None else ref
            d = y - ref
            row = dict(
                name=name,
                first_s=round(first, 2),
                s=round(s, 3),
                peak_GiB=None if SMALL else round(torch.cuda.max_memory_allocated() / 2**30, 1),
                max_abs=float(d.abs().max()),
                rel_l2=float(d.norm() / ref.norm()),
            )
            if name in ("default", "channels_last_3d"):
                with profile(activities=[ProfilerActivity.CPU if SMALL else ProfilerActivity.CUDA]) as p:
                    seconds(fn)
                key = "self_cpu_time_total" if SMALL else "self_cuda_time_total"
                profiles.append(
                    f"== {name}\n" + p.key_averages().table(sort_by=key, row_limit=14, max_name_column_width=70)
                )
            del y
        except Exception as e:  # one failing variant must not lose the others
            row = dict(name=name, error=f"{type(e).__name__}: {e}"[:500])
        rows.append(row)
        print(json.dumps(row), flush=True)
        if not SMALL:
            torch.cuda.empty_cache()
    torch.backends.cudnn.benchmark = True
    fn = variant(channels_last=True)
    seconds(fn)
    rows.append(dict(name="channels_last_3d+cudnn.benchmark", s=round(seconds(fn)[0], 3)))
    print(json.dumps(rows[-1]), flush=True)
    with open(os.path.join(out_dir, "decode_probe.json"), "w") as fh:
        json.dump(rows, fh, indent=1)
    with open(os.path.join(out_dir, "decode_profile.txt"), "w") as fh:
        fh.write("\n".join(profiles))


if __name__ == "__main__":
    main(sys.argv[1])
