"""A 2-D toy for the distillation losses: 8 Gaussians on a ring, small MLP denoisers, and the
teacher / KD / DMD2 training loops, all on CPU in seconds.

The loops use modules/flow.py for noising, time sampling and sampling, and modules/distill.py for
every distillation loss, exactly the functions the video stages (KDWarmup, DMD2) call; only the
networks and optimizers are the toy's own. Everything is seeded and runs in float32.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from modules import distill, flow

R = 2.0  # ring radius
SIGMA = 0.05 * R  # std of each mode
MODES = 8
TEACHER_STEPS = 35
EVAL_SAMPLES = 10_000


def centres() -> Tensor:
    angle = 2 * math.pi * torch.arange(MODES, dtype=torch.float32) / MODES
    return R * torch.stack([angle.cos(), angle.sin()], 1)


def sample_data(n: int, generator: torch.Generator) -> Tensor:
    """n points of the mixture, modes equally likely."""
    k = torch.randint(MODES, (n,), generator=generator)
    return centres()[k] + SIGMA * torch.randn(n, 2, generator=generator)


def mode_fractions(x: Tensor) -> Tensor:
    """(MODES,) fraction of the points within 3 sigma of each centre (the discs do not overlap,
    so the fractions add up to the share of points in some mode)."""
    d = torch.cdist(x.float(), centres())
    nearest = d.argmin(1)
    inside = d.gather(1, nearest[:, None])[:, 0] <= 3 * SIGMA
    return torch.bincount(nearest[inside], minlength=MODES).float() / len(x)


def energy_distance(x: Tensor, y: Tensor, n: int = 2000, seed: int = 0) -> float:
    """E||X - Y|| - 0.5 E||X - X'|| - 0.5 E||Y - Y'|| (Szekely & Rizzo) on n-point subsamples
    drawn with a fixed seed; 0 iff the distributions are equal (half the usual 2E||X-Y|| form)."""
    g = torch.Generator().manual_seed(seed)
    x = x[torch.randperm(len(x), generator=g)[:n]].double()
    y = y[torch.randperm(len(y), generator=g)[:n]].double()
    xy = torch.cdist(x, y).mean()
    # the diagonal zeros of ||X - X'|| are excluded (the unbiased U-statistic)
    xx = torch.cdist(x, x).sum() / (n * (n - 1))
    yy = torch.cdist(y, y).sum() / (n * (n - 1))
    return float(xy - 0.5 * xx - 0.5 * yy)


# --------------------------------------------------------------------------------------------
# Networks
# --------------------------------------------------------------------------------------------


class ToyNet(nn.Module):
    """Velocity-predicting MLP used through flow's x0 interface: `net(x_t, t) -> x0`.

    `features` is the hidden state after the middle layer: what a GAN head reads, as DMD2's
    classifier reads the fake score's bottleneck.
    """

    def __init__(self, width: int = 128, depth: int = 4, freqs: int = 8):
        super().__init__()
        self.register_buffer("freqs", math.pi * torch.arange(1, freqs + 1, dtype=torch.float32))
        dims = [2 + 1 + 2 * freqs] + [width] * depth
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.out = nn.Linear(width, 2)
        self.mid = depth // 2
        self.width = width

    def _embed(self, x: Tensor, t: Tensor) -> Tensor:
        t = t.float().reshape(-1, 1).expand(len(x), 1)
        return torch.cat([x.float(), t, (t * self.freqs).sin(), (t * self.freqs).cos()], 1)

    def _run(self, x: Tensor, t: Tensor, upto: int | None = None) -> Tensor:
        h = self._embed(x, t)
        for i, layer in enumerate(self.layers):
            h = F.silu(layer(h))
            if upto is not None and i + 1 == upto:
                return h
        return h

    def velocity(self, x: Tensor, t: Tensor) -> Tensor:
        return self.out(self._run(x, t))

    def features(self, x: Tensor, t: Tensor) -> Tensor:
        return self._run(x, t, upto=self.mid)

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        return flow.x0_from_velocity(x_t, self.velocity(x_t, t), t)


class Head(nn.Module):
    """GAN head: small MLP from denoiser features (and t) to one logit per sample."""

    def __init__(self, width: int = 128, hidden: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(width + 1, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, feats: Tensor, t: Tensor) -> Tensor:
        return self.net(torch.cat([feats, t.float().reshape(-1, 1)], 1))[:, 0]


def frozen(net: nn.Module) -> nn.Module:
    net = copy.deepcopy(net)
    net.requires_grad_(False)
    return net.eval()


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


def noise(n: int, seed: int) -> Tensor:
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def teacher_sample(teacher: nn.Module, z: Tensor) -> Tensor:
    """The teacher's 35-step DPM-Solver++(2M) sample from noise z (no CFG: the toy is
    unconditional, i.e. guidance 0)."""
    return flow.sample_dpmpp_2m(teacher, z, flow.schedule(TEACHER_STEPS))


@torch.no_grad()
def student_sample(student: nn.Module, z: Tensor, t_list=(1.0,), seed: int = 0) -> Tensor:
    return flow.sample_student(student, z, t_list, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------
# Training loops
# --------------------------------------------------------------------------------------------


def _adam(params, lr: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.99))


def _cosine(opt: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))


def train_teacher(steps: int = 3000, batch: int = 1024, lr: float = 2e-3, seed: int = 0) -> ToyNet:
    """The teacher: the rectified-flow loss (flow.velocity_loss) on the ring data."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    net = ToyNet()
    opt = _adam(net.parameters(), lr)
    sched = _cosine(opt, steps)
    for _ in range(steps):
        x0 = sample_data(batch, g)
        eps = torch.randn(batch, 2, generator=g)
        t = flow.sample_t(batch, "uniform", t_min=1e-3, generator=g)
        x_t = flow.add_noise(x0, eps, t)
        loss = flow.velocity_loss(net(x_t, t), x0, x_t, t).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return net.eval()


def train_kd(
    teacher: ToyNet, steps: int = 200, pairs: int = 20_000, batch: int = 1024, lr: float = 1e-3, seed: int = 0
) -> ToyNet:
    """1-step KD warmup: the student (from the teacher's weights) maps noise at t = 1 to the
    teacher's 35-step sample from that noise, with distill.kd_loss.

    The default is a short warmup (a rough start, as KD is meant to be before DMD2): trained to
    convergence (~1500 steps) the KD student is already within the energy-distance estimator's
    noise of the data here, and no later stage could be seen to improve on it.
    """
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 2)
    z = torch.randn(pairs, 2, generator=g)
    target = teacher_sample(teacher, z)
    student = copy.deepcopy(teacher).train()
    opt = _adam(student.parameters(), lr)
    sched = _cosine(opt, steps)
    one = torch.ones(batch)
    for _ in range(steps):
        i = torch.randint(pairs, (batch,), generator=g)
        loss = distill.kd_loss(student(z[i], one), target[i]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return student.eval()


@dataclass
class DMD2Config:
    turns: int = 4000
    batch: int = 512
    student_update_freq: int = 5
    student_lr: float = 3e-4
    critic_lr: float = 1e-3
    gan_weight: float = 0.03
    disc_weight: float = 1.0
    features: str = "fake"  # fake | teacher: whose trunk the GAN head reads
    t_list: tuple[float, ...] = (1.0,)
    student_lr_decay: bool = True  # cosine to 0 over the run: the last student is not a noisy iterate
    seed: int = 0


@dataclass
class DMD2Result:
    student: ToyNet
    cfg: DMD2Config
    student_steps: int  # read back from the optimizers' own step counters
    critic_steps: int


def _adam_steps(opt: torch.optim.Optimizer) -> int:
    state = opt.state[opt.param_groups[0]["params"][0]]
    return int(state["step"]) if state else 0


def train_dmd2(
    student: ToyNet, teacher: ToyNet, cfg: DMD2Config, on_turn: Callable[[int, ToyNet], None] | None = None
) -> DMD2Result:
    """DMD2 from a (KD) student: fake score from the teacher's weights, a GAN head on the fake
    score's or the teacher's middle features, real data noised for the discriminator. Every
    turn is one global step and steps exactly one side (distill.student_turn)."""
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed + 3)
    student = copy.deepcopy(student).train()
    teacher = frozen(teacher)
    fake = copy.deepcopy(teacher).requires_grad_(True).train()
    head = Head(fake.width)
    trunk = {"fake": fake, "teacher": teacher}[cfg.features]

    def disc(x_t: Tensor, t: Tensor) -> Tensor:
        return head(trunk.features(x_t, t), t)

    opt_student = _adam(student.parameters(), cfg.student_lr)
    opt_critic = _adam([*fake.parameters(), *head.parameters()], cfg.critic_lr)
    n_student = sum(distill.student_turn(k, cfg.student_update_freq) for k in range(cfg.turns))
    sched = _cosine(opt_student, n_student) if cfg.student_lr_decay else None
    B = cfg.batch
    for turn in range(cfg.turns):
        z = torch.randn(B, 2, generator=g)
        exit_step = distill.choose_exit_step(len(cfg.t_list), turn, cfg.seed)
        x_in, t_in = distill.backward_simulation(student, z, cfg.t_list, exit_step, generator=g)
        t = distill.critic_times(B, generator=g)
        eps = torch.randn(B, 2, generator=g)
        if distill.student_turn(turn, cfg.student_update_freq):
            x0_gen = student(x_in, t_in)
            loss, _ = distill.generator_turn_loss(x0_gen, t, eps, teacher, fake, disc, gan_weight=cfg.gan_weight)
            opt_student.zero_grad(set_to_none=True)
            loss.mean().backward()
            opt_student.step()
            if sched is not None:
                sched.step()
        else:
            with torch.no_grad():
                x0_gen = student(x_in, t_in)
            x0_data = sample_data(B, g)
            t_data = distill.critic_times(B, generator=g)
            eps_data = torch.randn(B, 2, generator=g)
            loss, _ = distill.critic_turn_loss(
                x0_gen, t, eps, fake, disc, x0_data, t_data, eps_data, disc_weight=cfg.disc_weight
            )
            opt_critic.zero_grad(set_to_none=True)
            loss.mean().backward()
            opt_critic.step()
        if on_turn is not None:
            on_turn(turn, student)
    return DMD2Result(student.eval(), cfg, _adam_steps(opt_student), _adam_steps(opt_critic))
