"""Network properties that need no outside reference: zero-init control, mixing, init, layering."""

import subprocess
import sys

import torch

from modules.denoiser import Cond, Denoiser
from modules.nets import mix_residuals, preset


def tiny(modalities=("edge",), seed=0):
    cfg = preset("tiny")
    cfg.modalities = list(modalities)
    return Denoiser.build(cfg, seed=seed).eval()


def batch(seed=0, B=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 16, 3, 8, 8, generator=g)
    text = torch.randn(B, 5, 32, generator=g)
    ctrl = {m: torch.randn(B, 16, 3, 8, 8, generator=g) for m in ("edge", "depth")}
    return x, text, ctrl


def test_zero_initialised_control_equals_base():
    model = tiny(("edge", "depth"))
    x, text, ctrl = batch()
    t = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        base = model.denoise(x, t, Cond(text=text))
        controlled = model.denoise(x, t, Cond(text=text, controls=ctrl, control_weights={"edge": 0.7}))
        assert base.abs().mean() > 0.1
        assert torch.equal(base, controlled)
        # once the projections move, the control must change the output
        model.controls["edge"].after_proj[0].weight.normal_(0, 0.1)
        moved = model.denoise(x, t, Cond(text=text, controls={"edge": ctrl["edge"]}))
    assert (moved - base).abs().max() > 1e-3


def test_mixing_hand_computed():
    # 2 controls, 1 token grid of 1x1x2 tokens; weights 0.9 and a mask map times 0.6
    r_a = [torch.tensor([[[1.0], [2.0]]])]  # (B=1, S=2, D=1)
    r_b = [torch.tensor([[[10.0], [20.0]]])]
    mask = torch.tensor([1.0, 1.0, 0.0, 0.0]).reshape(1, 1, 1, 1, 4)  # pools to [1, 0] over 2 tokens
    out = mix_residuals([r_a, r_b], [0.9, mask * 0.6], grid=(1, 1, 2))[0]
    # token 0: w = (0.9, 0.6), sum 1.5 > 1 -> (0.6, 0.4): 0.6*1 + 0.4*10 = 4.6
    # token 1: w = (0.9, 0.0), sum 0.9 -> unchanged: 0.9*2 = 1.8
    torch.testing.assert_close(out, torch.tensor([[[4.6], [1.8]]]))


def test_mixing_single_scalar_is_capped_at_one():
    r = [torch.ones(1, 2, 3)]
    assert torch.equal(mix_residuals([r], [1.0], (1, 1, 2))[0], r[0])
    torch.testing.assert_close(mix_residuals([r], [0.25], (1, 1, 2))[0], r[0] * 0.25)
    assert torch.equal(mix_residuals([r], [3.0], (1, 1, 2))[0], r[0])


def test_meta_build_equals_eager_build():
    cfg = preset("tiny")
    meta = Denoiser.build(cfg, seed=7)
    eager = Denoiser(cfg).init_weights(7)
    other = Denoiser.build(cfg, seed=8)
    a, b, c = meta.state_dict(), eager.state_dict(), other.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_conditioning_frames_are_returned_exactly():
    model = tiny()
    x, text, _ = batch()
    clean = torch.randn_like(x)
    frames = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    with torch.no_grad():
        x0 = model.denoise(x, 0.6, Cond(text=text, cond_latents=clean, cond_frames=frames))
    assert torch.equal(x0[0, :, 0], clean[0, :, 0]) and torch.equal(x0[1, :, :2], clean[1, :, :2])
    assert not torch.equal(x0[0, :, 1], clean[0, :, 1])


def test_activation_checkpointing_keeps_gradients():
    model = tiny()
    x, text, ctrl = batch()
    model.controls["edge"].after_proj[0].weight.data.normal_(0, 0.1)

    def grads():
        model.zero_grad()
        model.denoise(x, 0.5, Cond(text=text, controls={"edge": ctrl["edge"]})).square().mean().backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    plain = grads()
    for block in [*model.net.blocks, *model.controls["edge"].blocks]:
        block.checkpoint = True
    ckpt = grads()
    assert len(plain) == len(ckpt)
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(a, b)


def test_save_and_load_round_trip(tmp_path):
    model = tiny()
    model.save_pretrained(tmp_path)
    again = Denoiser.from_pretrained(tmp_path)
    x, text, ctrl = batch()
    with torch.no_grad():
        assert torch.equal(model.denoise(x, 0.4, Cond(text=text)), again.denoise(x, 0.4, Cond(text=text)))


def test_network_code_imports_no_lightning():
    code = (
        "import sys, modules.nets, modules.denoiser, modules.flow, modules.tokenizer, modules.text;"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
