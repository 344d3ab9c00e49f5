"""Context parallelism against one process, run under torchrun (gloo, fp32): each rank computes the
reference itself (the whole sequence, no group), then the same calls with the tokens split over
the world, plain and through FSDP2 over a data x context mesh; rank 0 writes the largest
differences to a JSON file."""

import argparse
import json

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.tensor import DTensor

from modules.denoiser import Cond, Denoiser
from modules.nets import preset
from modules.nets.context import check_heads
from modules.parallel import ShardingConfig, context_group, context_mesh, set_checkpointing, shard_mesh, shard_model

ARGS = argparse.Namespace(device="cpu", dtype=torch.float32, hw=(4, 4), text_dim=32, channels=16)


def inputs(frames: int, seed: int = 0):
    """Two samples on a (frames, h/2, w/2) token grid with every conditioning input the stages use."""
    g = torch.Generator().manual_seed(seed)
    C, (h, w), dev, dt = ARGS.channels, ARGS.hw, ARGS.device, ARGS.dtype

    def r(*s):
        return torch.randn(*s, generator=g).to(dev, dt)

    x = r(2, C, frames, h, w).requires_grad_(True)
    mask = torch.ones(2, 6, dtype=torch.bool, device=dev)
    mask[1, 4:] = False
    cond_frames = torch.zeros(2, frames, device=dev)
    cond_frames[0, 0] = 1
    pad = torch.zeros(1, 1, 4 * h, 4 * w, device=dev)
    pad[..., :, 3 * w :] = 1
    cond = Cond(
        text=r(2, 6, ARGS.text_dim),
        text_mask=mask,
        controls={"edge": r(2, C, frames, h, w), "blur": r(2, C // 2, frames, h, w)},
        control_weights={"edge": 0.7, "blur": torch.rand(2, 1, frames, 2 * h, 2 * w, generator=g).to(dev)},
        cond_latents=r(2, C, frames, h, w),
        cond_frames=cond_frames,
        fps=16.0,
        padding_mask=pad,
    )
    return x, torch.tensor([0.3, 0.8], device=dev), cond, r(2, C, frames, h, w)


def run(model: Denoiser, frames: int, upcast: bool = False):
    """Output, a loss through `denoise` and `features` (DMD2's GAN path), its parameter and input
    gradients; `upcast`: the same (bf16-rounded) inputs in fp32."""
    x, t, cond, w = inputs(frames)
    if upcast:
        from tools.bench.dmd2_stage import _cast

        x, cond, w = x.detach().float().requires_grad_(True), _cast(cond, torch.float32), w.float()
    out = model.denoise(x, t, cond)
    feats = model.features(x, t, cond, taps=(1,))[0]
    loss = (out * w).sum() + feats.pow(2).mean()
    loss.backward()
    grads = {}
    for n, p in model.named_parameters():
        if p.grad is not None:
            grads[n] = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad.clone()
    model.zero_grad(set_to_none=True)
    return out.detach(), feats.detach(), grads, x.grad


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to the reference's largest entry (fp32); on GPU in bf16 also
    the relative L2 error (ARGS.l2)."""
    a, b = a.float(), b.float()
    if ARGS.dtype != torch.float32:
        return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-12)


def compare(ref, got, summed_input: torch.Tensor) -> dict:
    out, feats, grads, _ = got
    rout, rfeats, rgrads, rx = ref
    assert set(grads) == set(rgrads), sorted(set(grads) ^ set(rgrads))

    def flat(g):
        return torch.cat([g[k].float().flatten() for k in sorted(rgrads)])

    return {
        "out": diff(out, rout),
        "features": diff(feats, rfeats),
        "grads": max(diff(grads[k], rgrads[k]) for k in rgrads),
        "grads_all": diff(flat(grads), flat(rgrads)),
        "input_grad": diff(summed_input, rx),
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--device", default="cpu", help="cpu (gloo, fp32) or cuda (nccl, bf16: relative L2 errors)")
    p.add_argument("--hw", default="4x4", help="latent height x width")
    p.add_argument("--frames", default="4,3", help="latent frame counts to test")
    a = p.parse_args()
    if a.device == "cuda":
        import os

        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if a.device == "cuda" else "gloo")
    check(a.out, a.preset, a.device, a.hw, a.frames)
    dist.destroy_process_group()


def check(out: str, preset_name: str = "tiny", device: str = "cpu", hw: str = "4x4", frames: str = "4,3") -> None:
    """The comparisons, in an initialised process group (also called by train_worker --cp_check)."""
    cuda = device == "cuda"
    if cuda:
        ARGS.device, ARGS.dtype = torch.device("cuda", torch.cuda.current_device()), torch.bfloat16
    torch.set_num_threads(1)
    world = dist.get_world_size()
    cfg = preset(preset_name, text_proj_in=None)
    cfg.modalities = ["edge", "blur"]
    ARGS.hw, ARGS.text_dim, ARGS.channels = (
        tuple(int(v) for v in hw.split("x")),
        cfg.dit.text_dim,
        cfg.dit.latent_channels,
    )
    model = Denoiser.build(cfg, seed=0, device=ARGS.device, dtype=ARGS.dtype)
    with torch.no_grad():  # non-zero control projections, so the control paths carry gradient
        g = torch.Generator().manual_seed(3)
        for n, prm in model.named_parameters():
            if "proj" in n:
                prm.copy_(torch.randn(prm.shape, generator=g) * 0.05)
    if cuda:  # 2b activations: recompute in backward (the collectives are re-run with it)
        set_checkpointing(model, "full")
    results = {}
    frame_counts = [int(f) for f in frames.split(",")]
    if cuda:  # bf16's own error: the one-GPU bf16 network against the same weights in fp32
        exact = Denoiser.build(cfg, seed=0, device=ARGS.device, dtype=torch.float32)
        exact.load_state_dict(model.state_dict())
        set_checkpointing(exact, "full")
        for frames in frame_counts:
            ref = run(exact, frames, upcast=True)
            got = run(model, frames)
            results[f"bf16_vs_fp32_{frames}"] = compare(ref, got, got[3])
        del exact, ref, got
        torch.cuda.empty_cache()
    for frames in frame_counts:  # split evenly, and padded to whole frames per rank
        ref = run(model, frames)
        model.set_context_parallel(dist.group.WORLD)
        got = run(model, frames)
        model.set_context_parallel(None)
        # partial-sum convention (modules/nets/context.py): the mean over the group is the gradient
        got[2].update({k: v / world for k, v in got[2].items()})
        for v in got[2].values():
            dist.all_reduce(v)
        xg = got[3].clone()
        dist.all_reduce(xg)
        results[f"plain_{frames}"] = compare(ref, got, xg / world)

    # FSDP2 over the flattened data x context mesh (dp 1 x cp world), attention checkpointing
    mesh = context_mesh(torch.device(ARGS.device).type, 1, world)
    with torch.device("meta"):
        sharded = Denoiser(cfg)
    shard_model(
        sharded,
        shard_mesh(mesh),
        ShardingConfig(param_dtype="bfloat16" if cuda else "none", reduce_dtype="float32", checkpointing="attention"),
    )
    sharded.to_empty(device=ARGS.device)
    set_model_state_dict(sharded, model.state_dict(), options=StateDictOptions(full_state_dict=True))
    sharded.set_context_parallel(context_group(mesh))
    for frames in frame_counts:
        ref = run(model, frames)
        got = run(sharded, frames)
        xg = got[3].clone()
        dist.all_reduce(xg)
        results[f"fsdp_{frames}"] = compare(ref, got, xg / world)
    try:  # Ulysses needs whole heads per rank
        check_heads(3, dist.group.WORLD)
        heads_error = None
    except ValueError as e:
        heads_error = str(e)
    if dist.get_rank() == 0:
        results = {"cases": results, "heads_error": heads_error}
        with open(out, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main()
