"""Rectified-flow math shared by training, distillation and inference.

One convention everywhere in the suite:

    x_t = (1 - t) x0 + t eps,   t in [0, 1]   (t = 0 is data, t = 1 is pure noise)
    v   = eps - x0                            (the velocity; the loss is taken in its space)
    x0  = x_t - t v

Everything downstream (losses, KD, DMD2, samplers, the inference module) talks to a network
through a `denoise(x_t, t) -> x0` callable and the conversions here, so a different
parameterization later is a new schedule, not a new trainer.

`t` may be a python float, a 0-d tensor, a (B,) tensor (one time per sample) or any tensor
that already broadcasts against x (e.g. (B, 1, T, 1, 1) for per-frame times); see `expand_t`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor

__all__ = [
    "STUDENT_T_LIST",
    "Denoise",
    "add_noise",
    "cfg",
    "eps_from_x0",
    "expand_t",
    "masked_mean",
    "sample_dpmpp_2m",
    "sample_euler",
    "sample_student",
    "sample_t",
    "schedule",
    "schedule_through",
    "shift",
    "student_t_list",
    "t_batch",
    "unshift",
    "velocity_from_x0",
    "x0_from_velocity",
    "velocity_loss",
]

TimeLike = float | Tensor
# denoise(x_t, t) -> x0 prediction, t a (B,) tensor of per-sample times.
Denoise = Callable[[Tensor, Tensor], Tensor]

# Transfer2.5's distilled 4-step schedule, before the shift of 5 (see `student_t_list`).
STUDENT_T_LIST: tuple[float, ...] = (1.0, 0.75, 0.5, 0.25)


# --------------------------------------------------------------------------------------------
# Broadcasting and conversions
# --------------------------------------------------------------------------------------------


def expand_t(t: TimeLike, x: Tensor) -> TimeLike:
    """Make `t` broadcast against `x` (the per-sample factor in x_t = (1 - t) x0 + t eps).

    A python number or 0-d tensor is returned as is; a (B,) tensor with B == x.shape[0] is
    viewed as (B, 1, ..., 1) with x's rank; anything else must already broadcast against x.
    """
    if not isinstance(t, Tensor):
        return t
    t = t.to(device=x.device)
    if t.ndim == 1 and x.ndim > 1 and t.shape[0] == x.shape[0]:
        return t.view(-1, *([1] * (x.ndim - 1)))
    return t


def _like(out: Tensor, ref: Tensor) -> Tensor:
    # A float32 (B,1,..) t would promote a bf16 x to float32; keep the caller's dtype.
    return out.to(ref.dtype)


def add_noise(x0: Tensor, eps: Tensor, t: TimeLike) -> Tensor:
    """x_t = (1 - t) x0 + t eps (the rectified-flow forward process)."""
    t = expand_t(t, x0)
    return _like((1 - t) * x0 + t * eps, x0)


def x0_from_velocity(x_t: Tensor, v: Tensor, t: TimeLike) -> Tensor:
    """x0 = x_t - t v, which follows from x_t = (1 - t) x0 + t eps and v = eps - x0."""
    t = expand_t(t, x_t)
    return _like(x_t - t * v, x_t)


def velocity_from_x0(x_t: Tensor, x0: Tensor, t: TimeLike) -> Tensor:
    """v = (x_t - x0) / t, the inverse of x0 = x_t - t v.

    Requires t > 0: at t = 0 the state is the data and carries no information about eps.
    """
    t = expand_t(t, x_t)
    return _like((x_t - x0) / t, x_t)


def eps_from_x0(x_t: Tensor, x0: Tensor, t: TimeLike) -> Tensor:
    """eps = (x_t - (1 - t) x0) / t, solving x_t = (1 - t) x0 + t eps for eps (t > 0)."""
    t = expand_t(t, x_t)
    return _like((x_t - (1 - t) * x0) / t, x_t)


def cfg(cond: Tensor, uncond: Tensor, guidance: TimeLike) -> Tensor:
    """Classifier-free guidance in Cosmos's form: pred = cond + g (cond - uncond).

    g = 0 is the conditional prediction; this equals the standard form
    uncond + w (cond - uncond) with w = g + 1 (Ho & Salimans 2022, Eq. 6), so guidance values
    from Cosmos specs and recipes mean the same here. Works on x0 or velocity predictions alike
    (both are affine in the network output). `guidance` may be per-sample (B,).
    """
    g = expand_t(guidance, cond)
    return _like(cond + g * (cond - uncond), cond)


# --------------------------------------------------------------------------------------------
# Time shift, training-time sampling, sampler grids
# --------------------------------------------------------------------------------------------


def shift(t: TimeLike, s: float) -> TimeLike:
    """t' = s t / (1 + (s - 1) t): the resolution-dependent time shift (SD3, Esser et al. 2024,
    Sec. 5.3.2). Keeps 0 and 1 fixed; s > 1 moves every interior t towards noise.
    """
    return s * t / (1 + (s - 1) * t)


def unshift(t: TimeLike, s: float) -> TimeLike:
    """u = t / (s - (s - 1) t), the inverse of `shift` (solve t = s u / (1 + (s - 1) u) for u)."""
    return t / (s - (s - 1) * t)


# `sample_t` and `schedule` take a `shift` argument that shadows the function.
_shift = shift


def sample_t(
    n: int,
    kind: str = "logit_normal",
    mean: float = 0.0,
    std: float = 1.0,
    shift: float = 1.0,
    t_min: float = 0.0,
    t_max: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Training times, shape (n,): u ~ U(0, 1) ("uniform") or u = sigmoid(N(mean, std^2))
    ("logit_normal", SD3, Esser et al. 2024, Eq. 19), then t = shift(u, shift), clamped into
    [t_min, t_max].
    """
    # Draw on the generator's device so a CPU generator keeps working for CUDA targets.
    draw_device = generator.device if generator is not None else device
    if kind == "uniform":
        u = torch.rand(n, generator=generator, device=draw_device, dtype=torch.float64)
    elif kind == "logit_normal":
        z = torch.randn(n, generator=generator, device=draw_device, dtype=torch.float64)
        u = torch.sigmoid(mean + std * z)
    else:
        raise ValueError(f"unknown time distribution {kind!r} (uniform | logit_normal)")
    t = _shift(u, shift).clamp(t_min, t_max)
    return t.to(device=device, dtype=dtype)


def schedule(steps: int, shift: float = 1.0, t_max: float = 1.0, t_min: float = 0.0) -> Tensor:
    """Sampler grid: steps + 1 strictly decreasing times from t_max to t_min, float64.

    The grid is uniform in the unshifted variable u and mapped through t = shift(u, s); the
    endpoints are unshifted first (`unshift`) so the grid starts and ends exactly at t_max and
    t_min in real time.
    """
    if steps < 1:
        raise ValueError("steps must be >= 1")
    if not 0.0 <= t_min < t_max <= 1.0:
        raise ValueError(f"need 0 <= t_min < t_max <= 1, got {t_min}, {t_max}")
    u = torch.linspace(unshift(t_max, shift), unshift(t_min, shift), steps + 1, dtype=torch.float64)
    ts = _shift(u, shift)
    ts[0], ts[-1] = t_max, t_min  # exact endpoints despite the unshift/shift round trip
    return ts


def _allocate(steps: int, lengths: Sequence[float]) -> list[int]:
    """Split `steps` into len(lengths) integers >= 1 proportional to `lengths` (largest
    remainder method: floor of the ideal share, then hand out what is left by remainder)."""
    total = sum(lengths)
    # Rounded so that segments equal up to float noise (e.g. after shift/unshift) tie exactly,
    # and ties then go to the earlier, noisier segment.
    ideal = [round(steps * length / total, 9) for length in lengths]
    counts = [max(1, math.floor(x)) for x in ideal]
    while sum(counts) < steps:  # most under-served segment first; ties go to the earlier one
        i = max(range(len(counts)), key=lambda j: (ideal[j] - counts[j], -j))
        counts[i] += 1
    while sum(counts) > steps:  # only when the >= 1 floor over-allocated tiny segments
        i = max((j for j in range(len(counts)) if counts[j] > 1), key=lambda j: counts[j] - ideal[j])
        counts[i] -= 1
    return counts


def schedule_through(steps: int, anchors: Iterable[float] | Tensor, shift: float = 1.0) -> Tensor:
    """Decreasing grid of `steps` intervals from 1 to 0 (float64) containing every anchor exactly.

    Rule: the anchors (real times in [0, 1], plus 1 and 0) cut [0, 1] into segments. Each segment
    gets a number of steps proportional to its length in the unshifted variable
    u = unshift(t, shift), at least 1, rounded by largest remainder; inside a segment the points
    are uniform in u and mapped back by `shift`, and the segment ends are the anchors themselves.
    With the student list (1, .75, .5, .25 before shift 5) and shift 5 the segments are equal
    in u, so a 35-step teacher grid is close to `schedule(35, 5)` yet passes through every
    student time, which lets KD targets be read off the teacher trajectory.
    """
    pts = anchors.tolist() if isinstance(anchors, Tensor) else list(anchors)
    if any(not 0.0 <= float(a) <= 1.0 for a in pts):
        raise ValueError(f"anchors must lie in [0, 1], got {pts}")
    bounds = sorted({1.0, 0.0, *map(float, pts)}, reverse=True)
    if steps < len(bounds) - 1:
        raise ValueError(f"{steps} steps cannot pass through {len(bounds) - 2} interior anchors")
    us = [unshift(b, shift) for b in bounds]
    counts = _allocate(steps, [hi - lo for hi, lo in zip(us[:-1], us[1:])])
    out: list[float] = [bounds[0]]
    for t_lo, u_hi, u_lo, k in zip(bounds[1:], us[:-1], us[1:], counts):
        inner = torch.linspace(u_hi, u_lo, k + 1, dtype=torch.float64)[1:-1]
        out += _shift(inner, shift).tolist() + [t_lo]
    return torch.tensor(out, dtype=torch.float64)


def student_t_list(t_list: Sequence[float] = STUDENT_T_LIST, shift: float = 5.0) -> tuple[float, ...]:
    """The student's times: shift(t, s) of each entry; the default gives Transfer2.5's
    distilled schedule 1.0, 0.9375, 0.8333.., 0.625."""
    return tuple(float(_shift(float(t), shift)) for t in t_list)


# --------------------------------------------------------------------------------------------
# Samplers
# --------------------------------------------------------------------------------------------


def _grid(ts: Tensor | Sequence[float]) -> list[float]:
    # Step coefficients are computed in python float64, whatever the state's dtype.
    grid = [float(t) for t in (ts.tolist() if isinstance(ts, Tensor) else ts)]
    if len(grid) < 2 or any(a <= b for a, b in zip(grid[:-1], grid[1:])) or grid[-1] < 0:
        raise ValueError(f"need >= 2 strictly decreasing times ending >= 0, got {grid}")
    return grid


def t_batch(t: float, x: Tensor) -> Tensor:
    """The time `t` for every sample of x, as samplers feed the network: (B,) of at least float32
    (bf16 cannot represent e.g. 0.8333, and the timestep embedding should see the time meant)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    return torch.full((x.shape[0],), t, device=x.device, dtype=dtype)


def _steps(n: int, progress: bool) -> Iterable[int]:
    if not progress:
        return range(n)
    from tqdm.auto import tqdm  # only paid for when asked

    return tqdm(range(n), desc="sampling", leave=False)


# on_state(t, x): called with the sampler's state x at each grid time t, the start and the end
# included (KD data records the teacher trajectory at the student's times through it).
OnState = Callable[[float, Tensor], None]


def sample_euler(
    denoise: Denoise,
    noise: Tensor,
    ts: Tensor | Sequence[float],
    progress: bool = False,
    on_state: OnState | None = None,
) -> Tensor:
    """First-order solver of the flow ODE dx/dt = v(x, t) on the grid `ts` (decreasing, starting
    with `noise` as the state at ts[0]):

        x_{t'} = x_t + (t' - t) v,   v = (x_t - x0_hat) / t
               = (1 - t') x0_hat + t' eps_hat          (eps_hat = eps_from_x0(x_t, x0_hat, t))

    which for this schedule is also DDIM (Song et al. 2021, Eq. 12 with eta = 0). A step to
    t' = 0 returns x0_hat itself. Returns the state at ts[-1] (the sample when ts[-1] = 0).
    """
    grid = _grid(ts)
    x = noise
    for i in _steps(len(grid) - 1, progress):
        t, t_next = grid[i], grid[i + 1]
        if on_state is not None:
            on_state(t, x)
        x0 = denoise(x, t_batch(t, x))
        if t_next == 0.0:
            x = _like(x0, noise)
        else:
            x = _like(x + (t_next - t) * velocity_from_x0(x, x0, t), noise)
    if on_state is not None:
        on_state(grid[-1], x)
    return x


def _lam(t: float) -> float:
    """Half log-SNR lambda_t = log(alpha_t / sigma_t) with alpha_t = 1 - t, sigma_t = t."""
    if t >= 1.0:
        return -math.inf
    if t <= 0.0:
        return math.inf
    return math.log((1.0 - t) / t)


def sample_dpmpp_2m(
    denoise: Denoise,
    noise: Tensor,
    ts: Tensor | Sequence[float],
    progress: bool = False,
    on_state: OnState | None = None,
) -> Tensor:
    """DPM-Solver++(2M), data-prediction multistep second order (Lu et al. 2022,
    arXiv:2211.01095, Algorithm 2), for alpha_t = 1 - t, sigma_t = t, lambda_t = log(alpha/sigma).

    With h_i = lambda_{t_i} - lambda_{t_{i-1}}, r_i = h_{i-1} / h_i and D_i the x0 estimate
    linearly extrapolated in lambda,

        D_i = (1 + 1/(2 r_i)) x0_hat_{i-1} - 1/(2 r_i) x0_hat_{i-2}
        x_{t_i} = (sigma_{t_i} / sigma_{t_{i-1}}) x_{t_{i-1}} - alpha_{t_i} (e^{-h_i} - 1) D_i.

    For this schedule alpha_{t_i} (1 - e^{-h_i}) = (t_{i-1} - t_i) / t_{i-1}, so the update is
    x_{t_i} = (t_i / t_{i-1}) x + (1 - t_i / t_{i-1}) D_i, and with D_i = x0_hat_{i-1} it is
    exactly the Euler step (the first-order DPM-Solver++ equals DDIM).

    First order where there is no usable history: the first step, and the step after a point at
    t = 1 (lambda = -inf makes h_{i-1} infinite, i.e. 1/(2 r_i) = 0). A step to t = 0 returns
    the plain x0_hat, not the extrapolation: lambda_0 = +inf makes h_i infinite and r_i = 0, so
    the extrapolation weight 1/(2 r_i) is unbounded (the "lower order final" choice of k-diffusion
    and diffusers). Returns the state at ts[-1].
    """
    grid = _grid(ts)
    x = noise
    prev_x0: Tensor | None = None
    for i in _steps(len(grid) - 1, progress):
        t, t_next = grid[i], grid[i + 1]
        if on_state is not None:
            on_state(t, x)
        x0 = denoise(x, t_batch(t, x))
        if t_next == 0.0:
            x = _like(x0, noise)
            break
        d = x0
        if prev_x0 is not None:
            h_prev = _lam(t) - _lam(grid[i - 1])
            if math.isfinite(h_prev):
                r = h_prev / (_lam(t_next) - _lam(t))
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * prev_x0
        x = _like((t_next / t) * x + (1 - t_next / t) * d, noise)
        prev_x0 = x0
    if on_state is not None:
        on_state(grid[-1], x)
    return x


def sample_student(
    denoise: Denoise,
    noise: Tensor,
    t_list: Sequence[float] | Tensor,
    generator: torch.Generator | None = None,
    renoise: str = "fresh",
) -> Tensor:
    """Few-step sampler of the distilled student on its fixed t-list (no CFG).

    `noise` is the state at t_list[0]. For each k: x0_k = denoise(x, t_k); if a next time
    exists, x = (1 - t_{k+1}) x0_k + t_{k+1} eps (the forward process, `add_noise`) with eps
    fresh N(0, I) ("fresh", DMD2 multi-step sampling, Yin et al. 2024, Sec. 4.3) or the eps
    implied by the prediction, eps_from_x0(x, x0_k, t_k) ("deterministic", i.e. DDIM on the
    t-list). Returns the last x0_k; calls `denoise` exactly len(t_list) times.
    """
    times = [float(t) for t in (t_list.tolist() if isinstance(t_list, Tensor) else t_list)]
    if not times:
        raise ValueError("empty t_list")
    if renoise not in ("fresh", "deterministic"):
        raise ValueError(f"unknown renoise mode {renoise!r} (fresh | deterministic)")
    x = noise
    x0 = noise
    for k, t in enumerate(times):
        x0 = denoise(x, t_batch(t, x))
        if k + 1 < len(times):
            if renoise == "fresh":
                eps = torch.randn(
                    x.shape,
                    generator=generator,
                    dtype=x.dtype,
                    device=generator.device if generator is not None else x.device,
                )
                eps = eps.to(x.device)
            else:
                eps = eps_from_x0(x, x0, t)
            x = add_noise(_like(x0, noise), eps, times[k + 1])
    return _like(x0, noise)


def velocity_loss(x0_pred: Tensor, x0: Tensor, x_t: Tensor, t: TimeLike, mask: Tensor | None = None) -> Tensor:
    """Rectified-flow matching loss (Liu et al. 2022, eq. 1; Lipman et al. 2023, eq. 23), per sample:

        L = mean over kept elements of || v_hat - (eps - x0) ||^2,   v_hat = (x_t - x0_hat) / t,

    with eps - x0 = (x_t - x0) / t, so the velocity error is (x0 - x0_hat) / t. `mask` (broadcastable
    to x0, 1 = counted) drops e.g. conditioning frames. Returns (B,) losses; average them for the batch.
    """
    t = expand_t(t, x0)
    return masked_mean(((x0.float() - x0_pred.float()) / t).square(), mask)


def masked_mean(err: Tensor, mask: Tensor | None) -> Tensor:
    """Per-sample mean of `err` (B, ...) over the elements where `mask` (broadcastable, 1 = counted)
    is set -> (B,); every element without a mask. A sample with nothing counted gives 0."""
    if mask is None:
        return err.flatten(1).mean(1)
    mask = mask.to(err.dtype).expand_as(err)
    return (err * mask).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp_min(1.0)
