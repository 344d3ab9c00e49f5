"""Loss math of the distillation stages (KDWarmup and DMD2), as plain tensor functions.

Everything is written against modules/flow.py's convention (x_t = (1 - t) x0 + t eps, networks
seen as `denoise(x_t, t) -> x0`), never against a network, so the LightningModules and the 2-D toy
test (tests/test_toy.py) run exactly the same math.

Every loss returns per-sample (B,) values; average them for the batch. `mask` (broadcastable to
x, 1 = counted) drops elements, e.g. conditioning latent frames; a masked mean is
sum(err * mask) / sum(mask) per sample, as in `flow.velocity_loss` (0 for a sample with nothing
kept). Dense losses are computed in float32 whatever the networks' dtype.

References:
    DMD:  Yin et al. 2024, "One-step Diffusion with Distribution Matching Distillation" (CVPR).
    DMD2: Yin et al. 2024, "Improved Distribution Matching Distillation for Fast Image Synthesis"
          (NeurIPS).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import flow

__all__ = [
    "backward_simulation",
    "choose_exit_step",
    "critic_times",
    "critic_turn_loss",
    "dmd_gradient",
    "dmd_loss",
    "fake_score_loss",
    "gan_discriminator_loss",
    "gan_generator_loss",
    "generator_turn_loss",
    "kd_loss",
    "student_turn",
]

# logits(x_t, t) -> per-sample (B,) or (B, ...) discriminator logits.
Discriminate = Callable[[Tensor, Tensor], Tensor]


def _per_sample(values: Tensor) -> Tensor:
    # A patch/token discriminator gives several logits per sample: each is its own classifier
    # (softplus applied per logit) and each counts equally in the sample's loss.
    return values.reshape(values.shape[0], -1).mean(1)


# --------------------------------------------------------------------------------------------
# KD warmup
# --------------------------------------------------------------------------------------------


def kd_loss(x0_student: Tensor, x0_teacher: Tensor, mask: Tensor | None = None) -> Tensor:
    """Knowledge-distillation regression, per sample: 0.5 * mean (x0_student - x0_teacher)^2.

    The student regresses the teacher's ODE solution from the same input state: DMD's regression
    loss (Sec. 3.3, on noise-sample pairs from the teacher's deterministic sampler) with an L2
    distance in latent space instead of LPIPS. The 0.5 makes the gradient the plain residual over
    the element count.
    """
    err = (x0_student.float() - x0_teacher.detach().float()).square()
    return 0.5 * flow.masked_mean(err, mask)


# --------------------------------------------------------------------------------------------
# Distribution matching (DMD / DMD2)
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def dmd_gradient(x0_gen: Tensor, x0_real: Tensor, x0_fake: Tensor, mask: Tensor | None = None) -> Tensor:
    """The distribution-matching gradient on the generator's output, float32 (B, ...):

        grad = (x0_fake - x0_real) / mean|x0_gen - x0_real|     (mean per sample over kept elements)

    DMD Eq. 7 gives grad_theta KL ~= E[w_t alpha_t (s_fake(x_t) - s_real(x_t)) dG/dtheta] with the
    scores s(x_t) = -(x_t - alpha_t mu(x_t)) / sigma_t^2 (Sec. 3.2), so alpha_t (s_fake - s_real)
    = alpha_t^2 (mu_fake - mu_real) / sigma_t^2; the weighting of Eq. 8,
    w_t = sigma_t^2 / alpha_t * CS / ||mu_real(x_t) - x||_1, cancels the time factors up to one
    alpha_t, leaving the x0-space difference over the mean absolute distance between the
    generated sample and the teacher's denoised estimate (DMD2 Eq. 1 keeps the same estimator).
    The remaining alpha_t = 1 - t is dropped, as the published implementations do.

    Zero where `mask` is 0. A non-finite value (the normaliser is 0 when x0_gen equals x0_real
    on every kept element, e.g. an all-masked sample) is set to 0: such a sample carries no
    direction to follow, and a max-float step would wreck the generator.
    """
    gen, real, fake = x0_gen.float(), x0_real.float(), x0_fake.float()
    scale = flow.masked_mean((gen - real).abs(), mask)
    grad = (fake - real) / scale.view(-1, *([1] * (gen.ndim - 1)))
    if mask is not None:
        grad = grad * mask.to(grad.dtype)
    return torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)


def dmd_loss(x0_gen: Tensor, x0_real: Tensor, x0_fake: Tensor, mask: Tensor | None = None) -> Tensor:
    """Distribution-matching loss, per sample: 0.5 * mean (x0_gen - stopgrad(x0_gen - grad))^2.

    A surrogate whose gradient w.r.t. x0_gen is grad * mask / (number of kept elements), i.e.
    DMD's Eq. 7 gradient (with `dmd_gradient`'s normalisation) pushed through autograd into the
    generator (DMD Algorithm 1, DMD2 Eq. 1). Its value is 0.5 * mean grad^2, a diagnostic only.
    """
    grad = dmd_gradient(x0_gen, x0_real, x0_fake, mask)
    gen = x0_gen.float()
    target = (gen - grad).detach()
    return 0.5 * flow.masked_mean((gen - target).square(), mask)


def fake_score_loss(
    x0_pred: Tensor, x0_gen: Tensor, x_t: Tensor, t: flow.TimeLike, mask: Tensor | None = None
) -> Tensor:
    """The fake score's denoising loss on generated samples (DMD Sec. 3.2, DMD2 Sec. 4.2): the
    rectified-flow loss (`flow.velocity_loss`) with the detached generator output as data, so the
    fake score tracks the generator's current distribution and no gradient reaches the generator.
    `x_t` must be noised from the same (detached) x0_gen.
    """
    return flow.velocity_loss(x0_pred, x0_gen.detach(), x_t, t, mask)


def gan_generator_loss(logits_fake: Tensor) -> Tensor:
    """Non-saturating generator loss, per sample: softplus(-D(fake)) = -log sigmoid(D(fake)),
    the generator's part of DMD2 Eq. 3 with D(.) given as logits."""
    return _per_sample(F.softplus(-logits_fake.float()))


def gan_discriminator_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Discriminator loss, per sample: softplus(D(fake)) + softplus(-D(real)), i.e.
    -log(1 - sigmoid(D(fake))) - log sigmoid(D(real)), the discriminator's part of DMD2 Eq. 3.
    Real and fake batches must have the same size (sample i of each is paired for the sum)."""
    return _per_sample(F.softplus(logits_fake.float())) + _per_sample(F.softplus(-logits_real.float()))


# --------------------------------------------------------------------------------------------
# Turn schedule and the random draws of a turn
# --------------------------------------------------------------------------------------------


def student_turn(turn: int, student_update_freq: int) -> bool:
    """Whether `turn` (the global step: one optimizer turn per step) updates the student.

    The two time-scale update rule (DMD2 Sec. 4.2): the student is updated on turns
    0, f, 2f, ... and the critics (fake score, GAN head) on every other turn, i.e. f - 1 critic
    updates per student update.
    """
    if student_update_freq < 1:
        raise ValueError(f"student_update_freq must be >= 1, got {student_update_freq}")
    return turn % student_update_freq == 0


def choose_exit_step(num_steps: int, step: int, seed: int) -> int:
    """The student step at which backward simulation stops for this turn, uniform in
    [0, num_steps).

    A pure function of (seed, step): every rank of a data-parallel (or sharded) run computes the
    same value without any communication, and a resumed run repeats it. It must be the same on
    every rank because the simulated depth decides how many student forward passes run, and a
    sharded student's forward passes are collectives. Python's `random.Random` seeded with a
    string hashes it with SHA-512 (independent of PYTHONHASHSEED and of torch's global RNG).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return random.Random(f"exit-step/{seed}/{step}").randrange(num_steps)


def critic_times(
    n: int,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
    t_min: float = 0.02,
    t_max: float = 0.98,
    device: torch.device | str | None = None,
) -> Tensor:
    """Times for the DMD gradient, the fake-score loss and the GAN branches, shape (n,) float32.

    DMD/DMD2 draw the timestep uniformly in [0.02 T, 0.98 T] (DMD Sec. 4.1 / Appendix,
    DMD2's released configs); here u is uniform between unshift(t_min) and unshift(t_max) and
    t = shift(u, s), so t always lies in [t_min, t_max] with the same resolution-dependent shift
    as the teacher's sampler and, unlike clamping a shifted draw (`flow.sample_t`), without
    point masses at the ends. With s = 1 it is U(t_min, t_max).
    """
    if not 0.0 < t_min < t_max < 1.0:
        raise ValueError(f"need 0 < t_min < t_max < 1, got {t_min}, {t_max}")
    lo, hi = flow.unshift(t_min, shift), flow.unshift(t_max, shift)
    draw_device = generator.device if generator is not None else device
    u = lo + (hi - lo) * torch.rand(n, generator=generator, device=draw_device, dtype=torch.float64)
    return flow.shift(u, shift).to(device=device, dtype=torch.float32)


@torch.no_grad()
def backward_simulation(
    student: flow.Denoise,
    noise: Tensor,
    t_list: Sequence[float] | Tensor,
    exit_step: int,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """The student's input at its step `exit_step`, as at inference (DMD2 Sec. 4.5).

    Runs `flow.sample_student` ("fresh" re-noising) without grad from `noise` at t_list[0]
    through the steps k < exit_step and returns (x, t): the state at t_list[exit_step] and that
    time as a (B,) tensor. The caller then computes x0_gen = student(x, t) with grad. With the
    same generator the states equal sample_student's; exit_step 0 returns `noise` itself.
    """
    times = [float(t) for t in (t_list.tolist() if isinstance(t_list, Tensor) else t_list)]
    if not 0 <= exit_step < len(times):
        raise ValueError(f"exit_step must be in [0, {len(times)}), got {exit_step}")
    x = noise
    for k in range(exit_step):
        x0 = student(x, flow.t_batch(times[k], x))
        # drawn exactly as sample_student draws it, so both consume the generator alike
        eps = torch.randn(
            x.shape, generator=generator, dtype=x.dtype, device=generator.device if generator is not None else x.device
        ).to(x.device)
        x = flow.add_noise(x0.to(noise.dtype), eps, times[k + 1])
    return x, flow.t_batch(times[exit_step], x)


# --------------------------------------------------------------------------------------------
# One DMD2 turn, from callables
# --------------------------------------------------------------------------------------------


def generator_turn_loss(
    x0_gen: Tensor,
    t: Tensor,
    eps: Tensor,
    real_fn: flow.Denoise,
    fake_fn: flow.Denoise,
    disc_fn: Discriminate | None = None,
    mask: Tensor | None = None,
    gan_weight: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The student's loss on a student turn: dmd_loss + gan_weight * gan_generator_loss.

    x0_gen (with grad) is noised to x_t = add_noise(x0_gen, eps, t). The teacher (`real_fn`,
    with CFG inside if any) and the fake score see x_t without grad; the discriminator sees it
    with grad, so its loss reaches the student through x_t (DMD2 Eq. 3, generator side). The
    GAN term is not masked here: the head pools the features it is given, and it is the head's
    job to leave conditioning frames out of that pooling.

    Returns the per-sample total and its parts (detached) for logging.
    """
    x_t = flow.add_noise(x0_gen, eps, t)
    with torch.no_grad():
        x0_real = real_fn(x_t.detach(), t)
        x0_fake = fake_fn(x_t.detach(), t)
    loss = dmd_loss(x0_gen, x0_real, x0_fake, mask)
    parts = {"dmd": loss.detach()}
    if disc_fn is not None and gan_weight:
        gan = gan_generator_loss(disc_fn(x_t, t))
        parts["gan"] = gan.detach()
        loss = loss + gan_weight * gan
    return loss, parts


def critic_turn_loss(
    x0_gen: Tensor,
    t: Tensor,
    eps: Tensor,
    fake_fn: flow.Denoise,
    disc_fn: Discriminate | None = None,
    x0_data: Tensor | None = None,
    t_data: Tensor | None = None,
    eps_data: Tensor | None = None,
    mask: Tensor | None = None,
    disc_weight: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The critics' loss on a critic turn: fake_score_loss + disc_weight * gan_discriminator_loss.

    The fake score learns to denoise x_t = add_noise(x0_gen, eps, t) built from the detached
    generator output; the discriminator separates that x_t from real data noised the same way,
    add_noise(x0_data, eps_data, t_data) (DMD2 Eq. 3, discriminator side, real images noised
    before the classifier as in DMD2 Sec. 4.3). With the GAN head on the fake score's features
    the discriminator loss also trains those features, as DMD2 does.

    Returns the per-sample total and its parts (detached) for logging.
    """
    x0_gen = x0_gen.detach()
    x_t = flow.add_noise(x0_gen, eps, t)
    loss = fake_score_loss(fake_fn(x_t, t), x0_gen, x_t, t, mask)
    parts = {"fake_score": loss.detach()}
    if disc_fn is not None:
        if x0_data is None or t_data is None or eps_data is None:
            raise ValueError("the discriminator needs real data: x0_data, t_data and eps_data")
        x_data = flow.add_noise(x0_data, eps_data, t_data)
        d = gan_discriminator_loss(disc_fn(x_data, t_data), disc_fn(x_t, t))
        parts["disc"] = d.detach()
        loss = loss + disc_weight * d
    return loss, parts
