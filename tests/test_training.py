"""Control training under FSDP2 on CPU (gloo): multi-process equivalence, accumulation, resume,
and the zero-initialised start. Runs the real Trainer + ModelParallelStrategy in subprocesses."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modules.parallel import ShardingConfig
from modules.stages.base import NetSpec, StageOptions, TextSpec
from modules.stages.control_training import ControlTraining
from tests.helpers import PATIENCE_S
from tests.helpers.latents import sample

ROOT = Path(__file__).resolve().parents[1]


def run(out: Path, nproc: int = 1, **kw) -> list[dict]:
    args = [f"--out={out}"] + [f"--{k}={v}" for k, v in kw.items()]
    if nproc == 1:
        cmd = [sys.executable, "-m", "tests.helpers.train_worker", *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "tests.helpers.train_worker",
            *args,
        ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=PATIENCE_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(nproc)]


def params(out: Path) -> dict:
    return torch.load(f"{out}.params.pt")


def test_two_processes_equal_one(tmp_path):
    # a clip threshold below the gradient norm, so clipping (a global norm over shards) acts
    two = run(tmp_path / "two", nproc=2, steps=3, global_batch=4, clip=0.05)
    one = run(tmp_path / "one", nproc=1, steps=3, global_batch=4, clip=0.05)
    assert two[0]["losses"] == two[1]["losses"]
    assert len(one[0]["losses"]) == 3
    for a, b in zip(two[0]["losses"], one[0]["losses"]):
        assert abs(a - b) < 1e-5
    # the full parameters every rank gathers are bitwise identical (nothing outside fully_shard)
    assert two[0]["digest"] == two[1]["digest"]
    p2, p1 = params(tmp_path / "two"), params(tmp_path / "one")
    moved = [k for k in p1 if k.startswith("controls.") and not torch.equal(p1[k], params_init(k, p1))]
    assert moved, "training changed no control parameter"
    for k in p1:
        torch.testing.assert_close(p2[k], p1[k], atol=1e-5, rtol=1e-5)


def params_init(key, trained):
    # zero-initialised projections are the clearest witness that the optimizer stepped
    return torch.zeros_like(trained[key]) if "proj" in key else trained[key]


def test_gradient_accumulation_equals_large_batch(tmp_path):
    run(tmp_path / "acc", steps=2, global_batch=4, micro=2)
    run(tmp_path / "big", steps=2, global_batch=4, micro=1)
    a, b = params(tmp_path / "acc"), params(tmp_path / "big")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-5)


def test_resume_gives_the_same_losses(tmp_path):
    full = run(tmp_path / "full", steps=4, epoch_steps=2)[0]["losses"]
    run(tmp_path / "first", steps=2, epoch_steps=2, ckpt_dir=tmp_path / "ckpt")
    ckpt = sorted((tmp_path / "ckpt").glob("*step=2*"))
    assert ckpt, list((tmp_path / "ckpt").iterdir())
    resumed = run(tmp_path / "resumed", steps=4, epoch_steps=2, resume=ckpt[0])[0]
    assert resumed["global_step"] == 4
    assert resumed["losses"] == pytest.approx(full[2:], abs=1e-6)


def tiny_edge_stage(net: NetSpec | None = None) -> ControlTraining:
    """The tiny edge ControlTraining, built in this process (no Trainer, fp32, precomputed text)."""
    module = ControlTraining(
        net=net or NetSpec("tiny"),
        modality="edge",
        options=StageOptions(
            text=TextSpec(encoder="none"), sharding=ShardingConfig(param_dtype="none", checkpointing="none")
        ),
    )
    module.configure_model()
    return module


def test_zero_initialised_control_starts_at_the_base_loss():
    module = tiny_edge_stage()
    batch = {k: torch.stack([sample(i)[k] for i in range(3)]) for k in sample(0)}
    with torch.no_grad():
        controlled = module.loss(batch, step=0)
        module.modality = None  # the same draws, no control branch
        base = module.loss(batch, step=0)
        assert torch.equal(controlled, base)
        module.modality = "edge"
        module.model.controls["edge"].after_proj[0].weight.normal_(0, 0.05)
        assert not torch.equal(module.loss(batch, step=0), base)


def test_net_control_sizes_the_branch_it_trains(tmp_path):
    from modules.denoiser import Denoiser
    from modules.nets import preset

    # over a saved base (no branches yet): a block beside every base block, copies of them
    cfg = preset("tiny", latent_channels=48)  # the stage's pixel tokenizer: 4x4 pixels x 3
    cfg.control.channels, cfg.modalities = 48, []
    Denoiser.build(cfg, seed=0).save_pretrained(tmp_path / "base")
    module = tiny_edge_stage(NetSpec(init_from=str(tmp_path / "base"), control={"blocks": 4, "every": 1}))
    branch = module.model.controls["edge"]
    assert (len(branch.blocks), branch.ctrl.every) == (4, 1)
    base_block = module.model.net.blocks[3].state_dict()
    for k, v in branch.blocks[3].state_dict().items():
        assert torch.equal(v, base_block[k]), k
    # a saved network whose branches exist keeps their size; an unknown field is named
    cfg.modalities = ["edge"]
    Denoiser.build(cfg, seed=0).save_pretrained(tmp_path / "teacher")
    with pytest.raises(ValueError, match="differs from the control branches"):
        tiny_edge_stage(NetSpec(init_from=str(tmp_path / "teacher"), control={"blocks": 4, "every": 1}))
    with pytest.raises(ValueError, match="unknown field.*depth"):
        tiny_edge_stage(NetSpec("tiny", control={"depth": 2}))


def test_ema_equals_its_formula():
    from modules.stages.ema import EMAWeights

    net = torch.nn.Linear(3, 2)
    net.bias.requires_grad_(False)  # only trainable parameters are shadowed
    d = 0.9
    p0 = net.weight.detach().clone()
    ema = EMAWeights(net, d)
    assert ema.names == ["weight"]
    values = [p0]
    for k in range(1, 4):
        with torch.no_grad():
            net.weight.copy_(torch.full_like(p0, float(k)))
        values.append(net.weight.detach().clone())
        ema.update(net)
    # ema_n = d^n p0 + sum_k (1 - d) d^(n-k) p_k
    n = len(values) - 1
    expected = d**n * values[0] + sum((1 - d) * d ** (n - k) * values[k] for k in range(1, n + 1))
    torch.testing.assert_close(ema.state_for(net)["weight"], expected)
    assert torch.equal(ema.state_for(net)["bias"], net.bias)


def test_control_training_weights_the_control_by_the_batch_mask():
    """A batch `mask` (shards' mask.mp4) weights the trained control as mask_path does in
    inference: all ones is the unmasked loss exactly, all zeros the loss without the control."""
    module = tiny_edge_stage()
    with torch.no_grad():  # a branch that does something (zero-initialised it adds nothing)
        module.model.controls["edge"].after_proj[0].weight.normal_(0, 0.05)
    batch = {k: torch.stack([sample(i)[k] for i in range(2)]) for k in sample(0)}
    ones = torch.ones(2, 1, 3, 16, 16)  # the pixel clip of the latents (pixel tokenizer, spatial 4)
    half = ones.clone()
    half[..., 8:] = 0
    with torch.no_grad():
        plain = module.loss(batch, step=0)
        assert torch.equal(module.loss(batch | {"mask": ones}, step=0), plain)
        zero = module.loss(batch | {"mask": torch.zeros_like(ones)}, step=0)
        module.modality = None  # the same draws, no control
        assert torch.equal(zero, module.loss(batch, step=0))
        module.modality = "edge"
        halved = module.loss(batch | {"mask": half}, step=0)
        assert not torch.equal(halved, plain) and not torch.equal(halved, zero)
