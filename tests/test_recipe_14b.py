"""The 14B recipe's sharding plan against the network it names, built on the meta device (no memory,
no weights): the parameter counts it states, the per-GPU memory of the fp32 weights, gradients,
AdamW moments and EMA sharded by FSDP2 over its GPUs, and the activation estimate from its clip
size, all recomputed here, so the recipe's numbers cannot drift from the code."""

import math
import re
from pathlib import Path

import torch
import yaml

from modules.denoiser import Denoiser
from modules.nets import preset

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "transfer2.5-14b" / "edge" / "control.yaml"
GiB = 2**30
H200 = 141e9  # bytes of one H200


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_14b_recipe_memory_plan_matches_a_meta_device_build():
    text = RECIPE.read_text()
    cfg = yaml.safe_load(text)
    init, trainer = cfg["model"]["init_args"], cfg["trainer"]
    net = preset(init["net"]["preset"])
    net.modalities = [init["modality"]]
    with torch.device("meta"):
        model = Denoiser(net)
    assert all(p.is_meta for p in model.parameters())
    total, branch = count(model), count(model.controls)
    stated = re.search(r"parameters: (\d+) \(base (\d+), edge branch (\d+)", text)
    assert tuple(int(v) for v in stated.groups()) == (total, total - branch, branch)
    assert init["trainable"] == "control" and 16e9 < total < 16.2e9

    # FSDP2 over every GPU: fp32 master weights of all networks; fp32 gradients, AdamW's two
    # moments and the EMA of the trained branch only
    gpus = trainer["devices"] * trainer["num_nodes"]
    sharding = init["options"]["sharding"]
    assert gpus == 8 and sharding["param_dtype"] == "bfloat16" and init["options"]["ema_decay"]
    per_gpu = {"weights": 4 * total, "grads": 4 * branch, "adamw": 8 * branch, "ema": 4 * branch}
    per_gpu = {k: v / gpus / GiB for k, v in per_gpu.items()}
    per_gpu["states"] = sum(per_gpu.values())
    line = re.search(r"per GPU \(GiB\): (.*)", text).group(1)
    assert {k: float(v) for k, v in (part.split() for part in line.split("|"))} == {
        k: round(v, 2) for k, v in per_gpu.items()
    }

    # full checkpointing keeps each block's bf16 input: tokens x dim x 2 bytes x (trunk + branch blocks)
    data, d = cfg["data"]["init_args"], net.dit
    assert sharding["checkpointing"] == "full"
    latent_frames = 1 + (data["num_frames"] - 1) // 4  # Wan2.1: causal, 4x in time, 8x in space
    tokens = latent_frames * (data["height"] // 8 // d.patch[1]) * (data["width"] // 8 // d.patch[2])
    assert tokens == 86_400
    cp = trainer["strategy"]["init_args"]["context_parallel_size"]
    assert d.heads % cp == 0  # the all-to-all attention splits the heads
    clip = tokens * d.dim * 2 * (d.depth + net.control.blocks) / GiB
    block = count(model.net.blocks[0]) * 2 / GiB  # one block's gathered bf16 parameters
    acts = re.search(r"\(GiB, estimate\): ([\d.]+) per clip .*\n#\s+x bf16 x \d+ blocks\), ([\d.]+) per GPU", text)
    assert (float(acts.group(1)), float(acts.group(2))) == (round(clip, 2), round(clip / cp, 2))
    assert f"parameters while it runs: {block:.2f} GiB" in text
    assert math.isclose(per_gpu["states"] + clip / cp + block, 27.9, abs_tol=0.1)
    assert (per_gpu["states"] + clip / cp + block) * GiB < 0.25 * H200  # "about 30 GB of the 141"
