"""Tests of modules/flow.py: each checks the math against a closed form, so a wrong sign,
coefficient or order in the code makes it fail."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from modules import flow

MU, S = 0.7, 0.3  # data distribution N(MU, S^2 I) of the oracle tests


def gaussian_denoiser(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Exact E[x0 | x_t] for x0 ~ N(MU, S^2 I), x_t = (1 - t) x0 + t eps."""
    t = flow.expand_t(t, x_t)
    gain = (1 - t) * S**2 / ((1 - t) ** 2 * S**2 + t**2)
    return MU + gain * (x_t - (1 - t) * MU)


def ode_target(z: torch.Tensor) -> torch.Tensor:
    """Where the probability-flow ODE takes noise z for Gaussian data: the flow is affine,
    x_t = (1 - t) MU + sqrt((1 - t)^2 S^2 + t^2) z, so at t = 0 it is MU + S z."""
    return MU + S * z


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).pow(2).mean().sqrt().item()


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------- conversions


@pytest.mark.parametrize("kind", ["float", "scalar_tensor", "batch", "per_frame"])
def test_noise_and_recover(kind: str) -> None:
    b, c, frames, h, w = 3, 4, 5, 6, 7
    x0 = torch.randn(b, c, frames, h, w, generator=gen(1), dtype=torch.float64)
    eps = torch.randn(b, c, frames, h, w, generator=gen(2), dtype=torch.float64)
    t = {
        "float": 0.3,
        "scalar_tensor": torch.tensor(0.3, dtype=torch.float64),
        "batch": torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64),
        "per_frame": torch.rand(b, 1, frames, 1, 1, generator=gen(3), dtype=torch.float64) * 0.9 + 0.05,
    }[kind]
    x_t = flow.add_noise(x0, eps, t)
    # the forward process itself, checked per sample against the definition
    tb = t if not isinstance(t, torch.Tensor) or t.ndim != 1 else t.view(-1, 1, 1, 1, 1)
    assert_close(x_t, (1 - tb) * x0 + tb * eps, rtol=0, atol=0)
    v = eps - x0
    assert_close(flow.x0_from_velocity(x_t, v, t), x0, rtol=1e-12, atol=1e-12)
    assert_close(flow.velocity_from_x0(x_t, x0, t), v, rtol=1e-10, atol=1e-10)
    assert_close(flow.eps_from_x0(x_t, x0, t), eps, rtol=1e-10, atol=1e-10)
    # v -> x0 -> v round trip from an arbitrary (not consistent) velocity
    v_any = torch.randn_like(x0)
    assert_close(flow.velocity_from_x0(x_t, flow.x0_from_velocity(x_t, v_any, t), t), v_any)


def test_batch_t_is_per_sample() -> None:
    x0, eps = torch.zeros(2, 3, 4), torch.ones(2, 3, 4)
    x_t = flow.add_noise(x0, eps, torch.tensor([0.25, 0.75]))
    assert torch.all(x_t[0] == 0.25) and torch.all(x_t[1] == 0.75)


def test_dtype_is_kept() -> None:
    x0 = torch.randn(2, 3, dtype=torch.bfloat16)
    out = flow.add_noise(x0, torch.randn_like(x0), torch.tensor([0.2, 0.4]))
    assert out.dtype == torch.bfloat16


def test_cfg() -> None:
    cond, uncond = torch.randn(2, 3, generator=gen(4)), torch.randn(2, 3, generator=gen(5))
    assert_close(flow.cfg(cond, uncond, 0.0), cond)
    assert_close(flow.cfg(cond, uncond, 1.0), 2 * cond - uncond)
    # Cosmos g equals standard-form w = g + 1
    assert_close(flow.cfg(cond, uncond, 3.0), uncond + 4.0 * (cond - uncond))
    per_sample = flow.cfg(cond, uncond, torch.tensor([0.0, 1.0]))
    assert_close(per_sample[0], cond[0])
    assert_close(per_sample[1], 2 * cond[1] - uncond[1])


# ---------------------------------------------------------------------------- shift & times


def test_shift() -> None:
    assert flow.shift(0.0, 5.0) == 0.0
    assert flow.shift(1.0, 5.0) == 1.0
    assert math.isclose(flow.shift(0.5, 5.0), 5 / 6, rel_tol=1e-12)
    assert math.isclose(flow.shift(0.25, 3.0), 0.5, rel_tol=1e-12)
    assert flow.shift(0.37, 1.0) == pytest.approx(0.37)
    u = torch.linspace(0, 1, 101, dtype=torch.float64)
    t = flow.shift(u, 5.0)
    assert torch.all(t[1:] > t[:-1])
    assert torch.all(t[1:-1] > u[1:-1])  # s > 1 moves interior times towards noise
    assert_close(flow.unshift(t, 5.0), u)


def test_student_t_list() -> None:
    got = flow.student_t_list()
    assert len(got) == 4
    for g, want in zip(got, (1.0, 0.9375, 0.833333, 0.625)):
        assert abs(g - want) < 1e-6
    assert flow.student_t_list(shift=1.0) == flow.STUDENT_T_LIST


def test_sample_t_uniform() -> None:
    t = flow.sample_t(20000, kind="uniform", generator=gen(6))
    assert t.shape == (20000,) and t.dtype == torch.float32
    assert t.min() >= 0 and t.max() <= 1
    assert abs(t.mean().item() - 0.5) < 0.01
    assert torch.equal(t, flow.sample_t(20000, kind="uniform", generator=gen(6)))


@pytest.mark.parametrize(("mean", "std"), [(0.0, 1.0), (-0.8, 1.0), (1.0, 0.5)])
def test_sample_t_logit_normal(mean: float, std: float) -> None:
    t = flow.sample_t(20000, kind="logit_normal", mean=mean, std=std, generator=gen(7))
    assert t.min() >= 0 and t.max() <= 1
    # sigmoid is monotone, so the median of sigmoid(N(m, s)) is sigmoid(m)
    assert abs(t.median().item() - 1 / (1 + math.exp(-mean))) < 0.01
    # std of logit(t) is the requested std (it is not a uniform draw renamed)
    assert abs(torch.logit(t.double()).std().item() - std) < 0.03 * std


def test_sample_t_shift_and_clamp() -> None:
    plain = flow.sample_t(20000, generator=gen(8))
    shifted = flow.sample_t(20000, shift=3.0, generator=gen(8))
    assert shifted.mean() > plain.mean() + 0.1
    assert_close(shifted, flow.shift(plain.double(), 3.0).float())
    clamped = flow.sample_t(20000, kind="uniform", t_min=0.2, t_max=0.9, generator=gen(9))
    assert clamped.min() >= 0.2 and clamped.max() <= 0.9
    with pytest.raises(ValueError):
        flow.sample_t(4, kind="beta")


def test_schedule() -> None:
    ts = flow.schedule(10)
    assert ts.shape == (11,) and ts[0] == 1.0 and ts[-1] == 0.0
    assert_close(ts, torch.linspace(1, 0, 11, dtype=torch.float64))
    ts = flow.schedule(35, shift=5.0)
    assert ts.shape == (36,) and ts[0] == 1.0 and ts[-1] == 0.0
    assert torch.all(ts[1:] < ts[:-1])
    assert_close(flow.unshift(ts, 5.0), torch.linspace(1, 0, 36, dtype=torch.float64))
    part = flow.schedule(8, shift=3.0, t_max=0.9, t_min=0.1)
    assert part[0] == 0.9 and part[-1] == 0.1 and torch.all(part[1:] < part[:-1])


def test_schedule_through() -> None:
    anchors = flow.student_t_list()
    ts = flow.schedule_through(35, anchors, shift=5.0)
    assert ts.shape == (36,) and ts[0] == 1.0 and ts[-1] == 0.0
    assert torch.all(ts[1:] < ts[:-1])
    values = ts.tolist()
    for a in anchors:
        assert a in values  # exactly, not approximately
    # equal segments in u = unshift(t): 35 = 9 + 9 + 9 + 8 steps
    idx = [values.index(a) for a in anchors] + [35]
    assert [j - i for i, j in zip(idx[:-1], idx[1:])] == [9, 9, 9, 8]
    # proportional in the unshifted variable when shift = 1: segment lengths .0625, .1042,
    # .2083, .625 of 35 steps -> 2.19, 3.65, 7.29, 21.9 -> largest remainder 2, 4, 7, 22
    ts1 = flow.schedule_through(35, anchors, shift=1.0).tolist()
    idx1 = [ts1.index(a) for a in anchors] + [35]
    assert [j - i for i, j in zip(idx1[:-1], idx1[1:])] == [2, 4, 7, 22]
    # every segment gets at least one step
    tight = flow.schedule_through(5, [0.99, 0.98, 0.97, 0.96], shift=1.0)
    assert tight.shape == (6,) and torch.all(tight[1:] < tight[:-1])
    with pytest.raises(ValueError):
        flow.schedule_through(3, anchors, shift=5.0)


# ---------------------------------------------------------------------------- samplers


def noise(n: int = 4096, seed: int = 10) -> torch.Tensor:
    return torch.randn(n, 2, 3, generator=gen(seed), dtype=torch.float64)


def test_euler_maps_noise_to_gaussian_data() -> None:
    z = noise()
    out = flow.sample_euler(gaussian_denoiser, z, flow.schedule(400))
    assert rms(out, ode_target(z)) < 2e-3  # per sample, not only in distribution
    assert abs(out.mean().item() - MU) < 0.01
    assert abs(out.std().item() - S) < 0.01


def test_dpmpp_2m_maps_noise_to_gaussian_data() -> None:
    z = noise()
    out = flow.sample_dpmpp_2m(gaussian_denoiser, z, flow.schedule(64))
    assert rms(out, ode_target(z)) < 2e-3
    assert abs(out.mean().item() - MU) < 0.01
    assert abs(out.std().item() - S) < 0.01


def test_dpmpp_2m_beats_euler_at_few_steps() -> None:
    z = noise()
    ts = flow.schedule(10)
    err_euler = rms(flow.sample_euler(gaussian_denoiser, z, ts), ode_target(z))
    err_2m = rms(flow.sample_dpmpp_2m(gaussian_denoiser, z, ts), ode_target(z))
    assert err_2m < 0.5 * err_euler


def test_convergence_orders() -> None:
    """Halving the step (uniform in lambda, away from the infinite ends, starting on the exact
    trajectory) halves Euler's error and quarters DPM-Solver++(2M)'s."""
    z = noise(512)

    def exact(t: float) -> torch.Tensor:
        return (1 - t) * MU + math.sqrt((1 - t) ** 2 * S**2 + t**2) * z

    def errors(sampler) -> list[float]:
        out = []
        for n in (32, 64):
            lam = torch.linspace(math.log(0.02 / 0.98), math.log(0.98 / 0.02), n + 1, dtype=torch.float64)
            ts = torch.sigmoid(-lam)  # t = 1 / (1 + e^lambda)
            out.append(rms(sampler(gaussian_denoiser, exact(ts[0].item()), ts), exact(ts[-1].item())))
        return out

    e32, e64 = errors(flow.sample_euler)
    assert 1.7 < e32 / e64 < 2.3
    d32, d64 = errors(flow.sample_dpmpp_2m)
    assert 3.3 < d32 / d64 < 4.7


def test_dpmpp_2m_first_order_where_documented() -> None:
    z = noise(64)
    # from t = 1 the first two steps have no finite history: identical to Euler
    ts = [1.0, 0.6, 0.3]
    assert_close(flow.sample_dpmpp_2m(gaussian_denoiser, z, ts), flow.sample_euler(gaussian_denoiser, z, ts))
    # inside (0, 1) the second step uses the correction
    ts = [0.9, 0.6, 0.3]
    diff = flow.sample_dpmpp_2m(gaussian_denoiser, z, ts) - flow.sample_euler(gaussian_denoiser, z, ts)
    assert diff.abs().max() > 1e-3


@pytest.mark.parametrize("sampler", [flow.sample_euler, flow.sample_dpmpp_2m])
def test_samplers_with_fixed_x0_oracle(sampler) -> None:
    target = torch.randn(2, 3, 4, generator=gen(11))
    calls: list[torch.Tensor] = []

    def oracle(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert t.shape == (x.shape[0],) and t.dtype == torch.float32
        calls.append(t[0].clone())
        return target

    out = sampler(oracle, torch.randn(2, 3, 4, generator=gen(12)), flow.schedule(7, shift=3.0))
    assert_close(out, target)
    assert len(calls) == 7
    assert_close(torch.stack(calls), flow.schedule(7, shift=3.0)[:-1].float())


def test_samplers_reject_bad_grid() -> None:
    with pytest.raises(ValueError):
        flow.sample_euler(gaussian_denoiser, noise(4), [0.0, 1.0])


# ---------------------------------------------------------------------------- student


@pytest.mark.parametrize("renoise", ["fresh", "deterministic"])
def test_student_with_fixed_x0_oracle(renoise: str) -> None:
    target = torch.randn(2, 3, 4, generator=gen(13))
    seen: list[float] = []

    def oracle(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append(t[0].item())
        return target

    t_list = flow.student_t_list()
    out = flow.sample_student(oracle, torch.randn(2, 3, 4), t_list, generator=gen(14), renoise=renoise)
    assert_close(out, target)
    assert len(seen) == len(t_list)
    assert seen == pytest.approx(list(t_list), abs=1e-7)


def test_student_renoise_modes() -> None:
    z = noise(256)
    t_list = flow.student_t_list()
    # deterministic renoising is the Euler/DDIM step on the t-list, ending with x0 at t_list[-1]
    det = flow.sample_student(gaussian_denoiser, z, t_list, renoise="deterministic")
    assert_close(det, flow.sample_euler(gaussian_denoiser, z, list(t_list) + [0.0]))
    # fresh renoising is reproducible from the generator and differs from deterministic
    a = flow.sample_student(gaussian_denoiser, z, t_list, generator=gen(15))
    b = flow.sample_student(gaussian_denoiser, z, t_list, generator=gen(15))
    assert torch.equal(a, b)
    assert (a - det).abs().max() > 1e-2
    # the posterior mean is unbiased (E[E[x0|x_t]] = MU) and renoising is affine with zero-mean
    # eps, so every step keeps E[x] = (1 - t) MU and the output mean is MU
    assert abs(a.mean().item() - MU) < 0.02
    with pytest.raises(ValueError):
        flow.sample_student(gaussian_denoiser, z, t_list, renoise="ancestral")
