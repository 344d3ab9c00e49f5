"""modules/distill.py: unit tests of the loss math, and a 2-D toy (8 Gaussians on a ring) where the
same functions must distill a 35-step teacher into a 1-step student (KD, then DMD2).

The toy's networks and loops live in tests/helpers/toy.py; this file states the claims. The toy
is unconditional, so the teacher runs without CFG (guidance 0). Everything is seeded; the toy
runs on 2 CPU threads as CI does.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.testing import assert_close

from modules import distill, flow
from tests.helpers import toy


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------- unit tests


def test_student_turn_schedule() -> None:
    assert [distill.student_turn(k, 5) for k in range(11)] == [True, False, False, False, False] * 2 + [True]
    assert all(distill.student_turn(k, 1) for k in range(4))
    with pytest.raises(ValueError):
        distill.student_turn(0, 0)


def _exit_steps_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        mine = [distill.choose_exit_step(4, step, seed=7) for step in range(64)]
        every = [None] * world
        dist.all_gather_object(every, mine)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"pid": os.getpid(), "all": every}, f)
    finally:
        dist.destroy_process_group()


def test_choose_exit_step_agrees_across_processes(tmp_path) -> None:
    mp.spawn(_exit_steps_worker, args=(2, str(tmp_path / "pg"), str(tmp_path)), nprocs=2, join=True)
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert got[0]["pid"] != got[1]["pid"] != os.getpid()
    ranks = got[0]["all"]
    here = [distill.choose_exit_step(4, step, seed=7) for step in range(64)]
    assert ranks[0] == ranks[1] == here  # two fresh interpreters and this one agree
    assert set(here) == {0, 1, 2, 3}  # varies with the step and covers every exit
    assert here != [distill.choose_exit_step(4, step, seed=8) for step in range(64)]
    assert distill.choose_exit_step(1, 123, 0) == 0


def test_dmd_gradient_hand_example() -> None:
    gen_ = torch.tensor([[1.0, 2.0], [3.0, 3.0], [0.0, 0.0]])
    real = torch.tensor([[0.0, 0.0], [3.0, 3.0], [1.0, 1.0]])
    fake = torch.tensor([[1.0, -2.0], [4.0, 5.0], [float("nan"), 2.0]])
    grad = distill.dmd_gradient(gen_, real, fake)
    # sample 0: mean|gen - real| = (1 + 2) / 2 = 1.5; sample 1: gen == real -> 0 / 0, inf -> 0;
    # sample 2: normaliser 1, a NaN in the fake prediction -> 0 there only
    want = torch.tensor([[1 / 1.5, -2 / 1.5], [0.0, 0.0], [0.0, 1.0]])
    assert_close(grad, want)
    assert grad.dtype == torch.float32
    assert distill.dmd_gradient(gen_.bfloat16(), real.bfloat16(), fake.bfloat16()).dtype == torch.float32
    # a mask: the normaliser counts the kept element only, the dropped element gets no gradient
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    assert_close(distill.dmd_gradient(gen_, real, fake, mask)[0], torch.tensor([1.0, 0.0]))


def test_dmd_loss_gradient_is_dmd_gradient() -> None:
    x = torch.randn(3, 4, 5, generator=gen(0), dtype=torch.float64)
    real, fake = torch.randn_like(x), torch.randn_like(x)
    x.requires_grad_(True)
    distill.dmd_loss(x, real, fake).sum().backward()
    assert_close(x.grad, distill.dmd_gradient(x, real, fake).double() / x[0].numel())
    # masked: gradient / (kept elements of the sample), nothing on dropped elements
    mask = (torch.rand(3, 1, 5, generator=gen(1)) > 0.4).double()
    x.grad = None
    distill.dmd_loss(x, real, fake, mask).sum().backward()
    kept = mask.expand_as(x).flatten(1).sum(1).view(-1, 1, 1)
    assert_close(x.grad, distill.dmd_gradient(x, real, fake, mask).double() / kept)
    assert torch.all(x.grad[mask.expand_as(x) == 0] == 0)


def test_losses_by_hand() -> None:
    a, b = torch.tensor([[1.0, 3.0]]), torch.tensor([[0.0, 1.0]])
    assert_close(distill.kd_loss(a, b), torch.tensor([0.5 * (1 + 4) / 2]))
    x0_gen, x_t, t = torch.tensor([[1.0, 1.0]]), torch.tensor([[0.5, 0.5]]), torch.tensor([0.5])
    assert_close(distill.fake_score_loss(x0_gen + 0.1, x0_gen, x_t, t), torch.tensor([(0.1 / 0.5) ** 2]))
    zero = torch.zeros(2)
    assert_close(distill.gan_generator_loss(zero), torch.full((2,), math.log(2)))
    assert_close(distill.gan_discriminator_loss(zero, zero), torch.full((2,), 2 * math.log(2)))
    # confident and right -> ~0; per-logit softplus averaged per sample for patch logits
    assert distill.gan_discriminator_loss(torch.tensor([20.0]), torch.tensor([-20.0])) < 1e-8
    patch = torch.tensor([[0.0, 20.0], [-20.0, 0.0]])
    assert_close(
        distill.gan_generator_loss(patch), torch.tensor([math.log(2) / 2, (20 + math.log(2)) / 2]), atol=1e-6, rtol=0
    )


def test_masks_exclude_elements() -> None:
    shape = (2, 3, 4, 2, 2)  # (B, C, T, H, W): the first latent frame is conditioning
    mask = torch.ones(2, 1, 4, 1, 1)
    mask[:, :, 0] = 0
    a, b, c = (torch.randn(shape, generator=gen(i)) for i in range(3))
    x_t, t = torch.randn(shape, generator=gen(3)), torch.tensor([0.3, 0.7])

    def scramble(x: torch.Tensor) -> torch.Tensor:  # change only the masked-out elements
        y = x.clone()
        y[:, :, 0] = 100.0
        return y

    losses = {  # (masked, the same loss on the kept frames only)
        "kd": (lambda a, b, c: distill.kd_loss(a, b, mask), lambda a, b, c: distill.kd_loss(a, b)),
        "dmd": (lambda a, b, c: distill.dmd_loss(a, b, c, mask), lambda a, b, c: distill.dmd_loss(a, b, c)),
        "fake_score": (
            lambda a, b, c: distill.fake_score_loss(a, b, x_t, t, mask),
            lambda a, b, c: distill.fake_score_loss(a, b, x_t[:, :, 1:], t),
        ),
    }
    for name, (masked, kept) in losses.items():
        ref = masked(a, b, c)
        assert ref.shape == (2,), name
        assert_close(masked(scramble(a), scramble(b), scramble(c)), ref, msg=name)
        assert_close(ref, kept(*(x[:, :, 1:] for x in (a, b, c))), msg=name)
    # no gradient reaches masked elements
    a.requires_grad_(True)
    (distill.kd_loss(a, b, mask).sum() + distill.dmd_loss(a, b, c, mask).sum()).backward()
    assert torch.all(a.grad[:, :, 0] == 0) and torch.any(a.grad[:, :, 1:] != 0)


class _Recorder:
    """A fixed nonlinear denoiser that records every state it is called with."""

    def __init__(self) -> None:
        self.states: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.states.append(x.clone())
        return torch.tanh(1.5 * x) * (1 - flow.expand_t(t, x)) + 0.3


def test_backward_simulation_matches_student_sampler() -> None:
    t_list = flow.student_t_list()
    noise = torch.randn(3, 2, 5, generator=gen(0))
    x, t = distill.backward_simulation(_Recorder(), noise, t_list, 0, generator=gen(1))
    assert x is noise and torch.equal(t, torch.full((3,), t_list[0]))
    ref = _Recorder()
    flow.sample_student(ref, noise, t_list, generator=gen(1))
    for k in range(1, len(t_list)):
        x, t = distill.backward_simulation(_Recorder(), noise, t_list, k, generator=gen(1))
        assert_close(x, ref.states[k], rtol=0, atol=0)
        assert_close(t, torch.full((3,), t_list[k]))
    # no graph, even for a student with trainable weights
    lin = torch.nn.Linear(5, 5)
    x, _ = distill.backward_simulation(lambda x, t: lin(x), noise, t_list, 2, generator=gen(1))
    assert not x.requires_grad
    with pytest.raises(ValueError):
        distill.backward_simulation(ref, noise, t_list, len(t_list))


def test_critic_times() -> None:
    t = distill.critic_times(20_000, generator=gen(0))
    assert t.dtype == torch.float32 and t.min() >= 0.02 and t.max() <= 0.98
    assert abs(t.mean().item() - 0.5) < 0.01  # U(0.02, 0.98) without shift
    ts = distill.critic_times(20_000, shift=5.0, generator=gen(0))
    assert ts.min() >= 0.02 - 1e-6 and ts.max() <= 0.98 + 1e-6
    assert_close(
        ts,
        flow.shift(
            flow.unshift(0.02, 5.0)
            + (flow.unshift(0.98, 5.0) - flow.unshift(0.02, 5.0))
            * torch.rand(20_000, generator=gen(0), dtype=torch.float64),
            5.0,
        ).float(),
    )
    assert torch.equal(distill.critic_times(8, 3.0, gen(4)), distill.critic_times(8, 3.0, gen(4)))


def test_turn_losses_route_gradients() -> None:
    """The generator turn's loss reaches the student only through x0_gen (teacher and fake score
    see a detached x_t, the discriminator a live one); the critic turn's never does."""
    w_real, w_fake, w_disc = (torch.randn(2, 2, generator=gen(i), requires_grad=True) for i in range(3))

    def real_fn(x, t):
        return x @ w_real

    def fake_fn(x, t):
        return x @ w_fake

    def disc_fn(x, t):
        return (x @ w_disc).sum(1)

    x0_gen = torch.randn(4, 2, generator=gen(5), requires_grad=True)
    t, eps = torch.full((4,), 0.5), torch.randn(4, 2, generator=gen(6))
    loss, parts = distill.generator_turn_loss(x0_gen, t, eps, real_fn, fake_fn, disc_fn, gan_weight=0.1)
    x_t = flow.add_noise(x0_gen, eps, t).detach()
    want = distill.dmd_loss(x0_gen, real_fn(x_t, t), fake_fn(x_t, t)) + 0.1 * distill.gan_generator_loss(
        disc_fn(x_t, t)
    )
    assert_close(loss, want)
    assert set(parts) == {"dmd", "gan"}
    loss.sum().backward()
    assert x0_gen.grad is not None and w_real.grad is None and w_fake.grad is None
    x0_gen.grad = None
    x0_data, eps_d = torch.randn(4, 2, generator=gen(7)), torch.randn(4, 2, generator=gen(8))
    loss, parts = distill.critic_turn_loss(x0_gen, t, eps, fake_fn, disc_fn, x0_data, t, eps_d)
    assert set(parts) == {"fake_score", "disc"}
    loss.sum().backward()
    assert x0_gen.grad is None and w_fake.grad is not None and w_disc.grad is not None


# ------------------------------------------------------------------------------- the toy


@pytest.fixture(scope="module", autouse=True)
def ci_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data() -> torch.Tensor:
    return toy.sample_data(toy.EVAL_SAMPLES, gen(7))


@pytest.fixture(scope="module")
def z() -> torch.Tensor:
    return toy.noise(toy.EVAL_SAMPLES, 123)


@pytest.fixture(scope="module")
def teacher() -> toy.ToyNet:
    return toy.train_teacher()


@pytest.fixture(scope="module")
def kd_student(teacher) -> toy.ToyNet:
    return toy.train_kd(teacher)


@pytest.fixture(scope="module", params=["fake", "teacher"])
def dmd2(request, teacher, kd_student) -> toy.DMD2Result:
    return toy.train_dmd2(kd_student, teacher, toy.DMD2Config(features=request.param))


def _report(name: str, x: torch.Tensor, data: torch.Tensor) -> tuple[torch.Tensor, float]:
    frac, ed = toy.mode_fractions(x), toy.energy_distance(x, data)
    print(
        f"\n{name}: modes {[round(f, 4) for f in frac.tolist()]} in some mode {frac.sum():.4f} energy distance {ed:.5f}"
    )
    return frac, ed


def test_teacher_covers_every_mode(teacher, z, data) -> None:
    frac, _ = _report("teacher 35 steps", toy.teacher_sample(teacher, z), data)
    assert torch.all((frac - 1 / toy.MODES).abs() <= 0.03), frac
    assert frac.sum() >= 0.90


def test_kd_student_beats_untrained(teacher, kd_student, z, data) -> None:
    _, ed_untrained = _report("untrained 1-step (teacher weights)", toy.student_sample(teacher, z), data)
    _, ed_kd = _report("KD 1-step", toy.student_sample(kd_student, z), data)
    assert ed_kd < ed_untrained


def test_dmd2_student_improves_on_kd(dmd2, kd_student, z, data) -> None:
    _, ed_kd = _report("KD 1-step", toy.student_sample(kd_student, z), data)
    frac, ed = _report(
        f"DMD2 1-step (GAN head on {dmd2.cfg.features} features)", toy.student_sample(dmd2.student, z), data
    )
    assert torch.all(frac >= 0.05), frac
    assert ed < ed_kd
    # every turn is one global step and steps one side: the student on turns 0, f, 2f, ...
    turns, freq = dmd2.cfg.turns, dmd2.cfg.student_update_freq
    assert dmd2.student_steps == math.ceil(turns / freq)
    assert dmd2.student_steps + dmd2.critic_steps == turns
