"""Tests for modules/tokenizer.py. Every model is built here and saved to tmp_path; nothing downloads."""

from __future__ import annotations

import copy
import functools
import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from modules.tokenizer import (
    CosmosJITTokenizer,
    PixelTokenizer,
    Tokenizer,
    WanTokenizer,
    build_tokenizer,
)


def _video(b: int, t: int, h: int, w: int, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, t, h, w, generator=g) * 2 - 1


# ----------------------------------------------------------------------------------------------
# pixel


@pytest.mark.parametrize("spatial,temporal", [(4, 1), (2, 2), (1, 1)])
def test_pixel_round_trip_is_exact(spatial: int, temporal: int) -> None:
    tok = PixelTokenizer(spatial=spatial, temporal=temporal)
    x = _video(2, 4, 8, 12)
    z = tok.encode(x)
    assert tuple(z.shape) == (2, *tok.latent_shape(4, 8, 12))
    assert tok.latent_channels == 3 * spatial * spatial * temporal
    assert torch.equal(tok.decode(z), x)


def test_pixel_layout_is_space_to_depth() -> None:
    # a latent channel must hold one (rgb, dt, dy, dx) phase of the pixel grid
    tok = PixelTokenizer(spatial=2, temporal=2)
    x = _video(1, 4, 4, 6)
    z = tok.encode(x)
    # channel index = ((c * t + dt) * s + dy) * s + dx
    c, dt, dy, dx = 2, 1, 0, 1
    assert torch.equal(z[:, ((c * 2 + dt) * 2 + dy) * 2 + dx], x[:, c, dt::2, dy::2, dx::2])


def test_pixel_shapes_and_inverse_rules() -> None:
    tok = PixelTokenizer(spatial=4, temporal=2)
    assert isinstance(tok, Tokenizer)
    assert tok.latent_shape(8, 16, 32) == (96, 4, 4, 8)
    for latent_frames in (1, 3, 7):
        assert tok.latent_shape(tok.num_frames(latent_frames), 16, 16)[1] == latent_frames
    assert PixelTokenizer(spatial=2).num_frames(5) == 5


@pytest.mark.parametrize(
    "frames,height,width,match",
    [
        (5, 16, 16, "divisible by 2"),
        (4, 18, 16, "multiples of 4"),
        (4, 16, 10, "multiples of 4"),
        (0, 16, 16, "at least 1"),
    ],
)
def test_pixel_bad_sizes_raise(frames: int, height: int, width: int, match: str) -> None:
    tok = PixelTokenizer(spatial=4, temporal=2)
    with pytest.raises(ValueError, match=match):
        tok.latent_shape(frames, height, width)
    if frames > 0:
        with pytest.raises(ValueError, match=match):
            tok.encode(_video(1, frames, height, width))


def test_pixel_bad_tensors_raise() -> None:
    tok = PixelTokenizer(spatial=2)
    with pytest.raises(ValueError, match=r"\(B, 3, T, H, W\)"):
        tok.encode(torch.zeros(1, 4, 2, 4, 4))
    with pytest.raises(ValueError, match="12"):
        tok.decode(torch.zeros(1, 3, 2, 4, 4))


def test_frozen_and_no_grad_default() -> None:
    parent = nn.Module()
    parent.tok = PixelTokenizer(spatial=2)
    parent.train()  # what Lightning does to the whole LightningModule every epoch
    assert parent.training and not parent.tok.training
    x = _video(1, 2, 4, 4).requires_grad_()
    assert not parent.tok.encode(x).requires_grad
    # opting out of no_grad lets gradients reach the input (e.g. a pixel-space loss)
    tok = PixelTokenizer(spatial=2, no_grad=False)
    tok.decode(tok.encode(x)).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


# ----------------------------------------------------------------------------------------------
# cosmos-jit: a causal 4x8x8 toy tokenizer written as TorchScript, like NVIDIA ships them

C, TF, SF = 4, 4, 8


class _CausalEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(3, C, kernel_size=(TF, SF, SF), stride=(TF, SF, SF))
        self.pad = TF - 1  # an attribute: TorchScript cannot read module globals

    def forward(self, x: Tensor) -> tuple[Tensor]:
        # replicate the first frame TF-1 times so 1 + TF*k frames give 1 + k latent frames
        x = torch.cat([x[:, :, :1].expand(-1, -1, self.pad, -1, -1), x], dim=2)
        return (self.conv(x),)  # Cosmos encoders may return a tuple


class _CausalDecoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.deconv = nn.ConvTranspose3d(C, 3, kernel_size=(TF, SF, SF), stride=(TF, SF, SF))
        self.pad = TF - 1

    def forward(self, z: Tensor) -> Tensor:
        return torch.tanh(self.deconv(z)[:, :, self.pad :])


@functools.cache
def _scripted() -> tuple[torch.jit.ScriptModule, torch.jit.ScriptModule]:
    # once per session: TorchScript refuses to compile the same class twice
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.script(_CausalEncoder().eval()), torch.jit.script(_CausalDecoder().eval())


def _write_cosmos(
    root: Path, config: bool = True
) -> tuple[torch.jit.ScriptModule, torch.jit.ScriptModule, Tensor, Tensor]:
    enc, dec = _scripted()
    torch.manual_seed(0)
    root.mkdir(parents=True, exist_ok=True)
    enc.save(str(root / "encoder.jit"))
    dec.save(str(root / "decoder.jit"))
    # per-latent-frame statistics for 3 frames, stored flat: must be reshaped and sliced
    mean = torch.randn(C, 3) * 0.5
    std = torch.rand(C, 3) + 0.5
    torch.save((mean, std), root / "mean_std.pt")
    if config:
        (root / "config.json").write_text(
            json.dumps({"latent_channels": C, "temporal_factor": TF, "spatial_factor": SF})
        )
    return enc, dec, mean.view(1, C, 3, 1, 1), std.view(1, C, 3, 1, 1)


@pytest.mark.parametrize("from_config", [True, False])
def test_cosmos_jit_normalisation(tmp_path: Path, from_config: bool) -> None:
    enc, dec, mean, std = _write_cosmos(tmp_path, config=from_config)
    kwargs = {} if from_config else {"latent_channels": C, "temporal_factor": TF, "spatial_factor": SF}
    tok = build_tokenizer("cosmos-jit", str(tmp_path), **kwargs)
    assert (tok.latent_channels, tok.temporal_factor, tok.spatial_factor) == (C, TF, SF)
    assert not any(p.requires_grad for p in tok.parameters()) and not tok.training

    x = _video(2, 5, 16, 24)
    z = tok.encode(x)
    assert tuple(z.shape) == (2, *tok.latent_shape(5, 16, 24)) == (2, C, 2, 2, 3)
    m, s = mean[:, :, :2], std[:, :, :2]
    raw = enc(x)[0]
    assert torch.equal(z, (raw - m) / s)
    assert torch.equal(tok.decode(z), dec(z * s + m))
    torch.testing.assert_close(tok.decode(z), dec(raw))
    assert tok.num_frames(2) == 5 and tuple(tok.decode(z).shape) == tuple(x.shape)


def test_cosmos_jit_frame_rules_and_stat_length(tmp_path: Path) -> None:
    _write_cosmos(tmp_path)
    tok = CosmosJITTokenizer(tmp_path)
    with pytest.raises(ValueError, match=r"1 \+ 4\*k"):
        tok.encode(_video(1, 4, 16, 16))
    with pytest.raises(ValueError, match="multiples of 8"):
        tok.latent_shape(5, 12, 16)
    # statistics cover 3 latent frames only: 4 must be refused, not silently broadcast
    with pytest.raises(ValueError, match="cover 3"):
        tok.encode(_video(1, 13, 8, 8))


def test_cosmos_jit_missing_file(tmp_path: Path) -> None:
    _write_cosmos(tmp_path)
    (tmp_path / "decoder.jit").unlink()
    with pytest.raises(FileNotFoundError, match="decoder.jit"):
        CosmosJITTokenizer(tmp_path)


# ----------------------------------------------------------------------------------------------
# wan2.1 through diffusers' AutoencoderKLWan

MEAN = [0.3, -0.7, 1.1, 0.05]
STD = [0.5, 2.0, 1.5, 0.8]


@pytest.fixture(scope="module")
def wan(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLWan(
        base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, latents_mean=MEAN, latents_std=STD
    )
    root = tmp_path_factory.mktemp("wan")
    vae.save_pretrained(root)
    return root, vae.eval()


def test_wan_normalisation_matches_diffusers(wan: tuple[Path, nn.Module]) -> None:
    wan_dir, vae = wan
    tok = WanTokenizer(wan_dir)
    assert (tok.latent_channels, tok.temporal_factor, tok.spatial_factor) == (4, 4, 8)
    assert not any(p.requires_grad for p in tok.parameters()) and not tok.training

    x = _video(1, 5, 16, 16)
    z = tok.encode(x)
    assert tuple(z.shape) == (1, *tok.latent_shape(5, 16, 16)) == (1, 4, 2, 2, 2)
    mean = torch.tensor(MEAN).view(1, 4, 1, 1, 1)
    std = torch.tensor(STD).view(1, 4, 1, 1, 1)
    with torch.no_grad():
        expected = (vae.encode(x).latent_dist.mode() - mean) / std
        torch.testing.assert_close(z, expected, rtol=0, atol=1e-6)
        lat = torch.randn(1, 4, 2, 2, 2)
        torch.testing.assert_close(tok.decode(lat), vae.decode(lat * std + mean).sample, rtol=0, atol=1e-6)
    assert tok.decode(z).shape == x.shape


def test_wan_channels_last_and_compiled_decoder_decode_the_same(wan: tuple[Path, nn.Module]) -> None:
    # the decode speed options (docs/benchmarks.md) must not change what is decoded; aot_eager runs
    # Dynamo's capture of diffusers' per-frame decoder loop and its cache, without inductor's
    # minutes of CPU compilation
    vae = wan[1]
    plain = WanTokenizer(vae=copy.deepcopy(vae))
    fast = WanTokenizer(vae=copy.deepcopy(vae), channels_last=True, compile="aot_eager")
    conv = next(m for m in fast.vae.decoder.modules() if isinstance(m, nn.Conv3d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
    lat = torch.randn(1, 4, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    expected = plain.decode(lat)
    for _ in range(2):  # the second call runs the graphs the first compiled
        torch.testing.assert_close(fast.decode(lat), expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="exactly one of path"):
        WanTokenizer()


def test_wan_rules_dtype_and_errors(
    wan: tuple[Path, nn.Module], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wan_dir = wan[0]
    tok = WanTokenizer(wan_dir, dtype="bfloat16")
    assert tok.vae.dtype == torch.bfloat16
    z = tok.encode(_video(1, 1, 8, 8))  # a single image is a valid causal clip
    assert z.dtype == torch.float32 and tuple(z.shape) == (1, 4, 1, 1, 1)
    with pytest.raises(ValueError, match=r"1 \+ 4\*k"):
        tok.encode(_video(1, 4, 16, 16))
    with pytest.raises(FileNotFoundError, match="config.json"):
        WanTokenizer(tmp_path / "nowhere")
    monkeypatch.setitem(sys.modules, "diffusers", None)  # simulate the extra not being installed
    with pytest.raises(ImportError, match=r'pip install -e "\.\[wan\]"'):
        WanTokenizer(wan_dir)


# ----------------------------------------------------------------------------------------------
# factory


def test_build_tokenizer_errors() -> None:
    assert isinstance(build_tokenizer("pixel", spatial=2), PixelTokenizer)
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        build_tokenizer("vqgan")
    for kind in ("cosmos-jit", "wan2.1"):
        with pytest.raises(ValueError, match="needs path"):
            build_tokenizer(kind)
