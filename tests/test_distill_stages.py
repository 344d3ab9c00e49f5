"""KD data, KDWarmup and DMD2 on tiny networks (CPU): what the data holds, what each stage
trains when, and exact resume. The loss math itself is proven on the 2-D toy (test_toy.py)."""

from __future__ import annotations

import os
from dataclasses import replace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from modules.denoiser import Cond, Denoiser
from modules.nets import preset
from modules.parallel import ShardingConfig
from modules.stages.base import OPTIONS, NetSpec, OptimSpec, StageOptions, TextSpec, TokenizerSpec
from modules.stages.dmd2 import DMD2, GANSpec
from modules.stages.kd_warmup import KDWarmup
from tests.helpers.latents import LATENT, loader

FP32 = ShardingConfig(param_dtype="none", checkpointing="none")
NO_IO = dict(options=StageOptions(tokenizer=TokenizerSpec(kind="none"), text=TextSpec(encoder="none"), sharding=FP32))


def teacher_dir(path, channels: int = LATENT[0], seed: int = 0) -> str:
    cfg = preset("tiny", latent_channels=channels)
    cfg.control.channels, cfg.modalities = channels, ["edge"]
    net = Denoiser.build(cfg, seed=seed)
    with torch.no_grad():  # a control branch that does something (zero-init would hide it)
        for p in net.controls.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(7)))
    net.save_pretrained(path)
    return str(path)


def trainer(steps: int, callbacks=(), **kw) -> L.Trainer:
    kw.setdefault("enable_checkpointing", False)
    return L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
        limit_val_batches=0,
        **kw,
    )


def state(module: torch.nn.Module | None) -> dict[str, torch.Tensor]:
    return {} if module is None else {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict, module: torch.nn.Module | None, prefix: str = "") -> bool:
    now = state(module)
    return any(not torch.equal(before[k], v) for k, v in now.items() if k.startswith(prefix))


class Watch(Callback):
    """Per batch: which networks changed, and the loss."""

    def __init__(self):
        self.changes, self.losses, self.prev = [], [], None

    def on_train_batch_start(self, trainer, m, batch, batch_idx):
        self.prev = {n: state(getattr(m, n)) for n in ("student", "teacher", "fake_score", "gan_head")}
        self.prev["student_base"] = self.prev["student"]

    def on_train_batch_end(self, trainer, m, outputs, batch, batch_idx):
        self.changes.append(
            {n: changed(self.prev[n], getattr(m, n)) for n in ("student", "teacher", "fake_score", "gan_head")}
            | {"student_base": changed(self.prev["student"], m.student, "net.")}
        )
        self.losses.append(float(outputs["loss"]))


def dmd2(tmp_path, **kw) -> DMD2:
    args = dict(
        teacher=NetSpec(init_from=teacher_dir(tmp_path / "teacher")),
        guidance=1.0,
        student_update_freq=3,
        gan=GANSpec(weight=0.1, critic_weight=0.1, taps=(1,), hidden=32),
        student_optim=OptimSpec(lr=1e-3, warmup_steps=1),
        critic_optim=OptimSpec(lr=1e-3, warmup_steps=1),
        **NO_IO,
    )
    options = {k: kw.pop(k) for k in list(kw) if k in OPTIONS}  # StageOptions fields by name
    args["options"] = replace(args["options"], **options)
    return DMD2(**(args | kw))


def test_dmd2_turns_step_one_optimizer_each(tmp_path):
    module, watch = dmd2(tmp_path), Watch()
    tr = trainer(6, [watch])
    tr.fit(module, loader(6, 2))
    assert tr.global_step == 6  # one optimizer step per turn
    for turn, c in enumerate(watch.changes):
        assert not c["teacher"], f"teacher changed on turn {turn}"
        if turn % 3 == 0:
            assert c["student"] and not c["fake_score"] and not c["gan_head"], (turn, c)
        else:
            assert not c["student"] and c["fake_score"] and c["gan_head"], (turn, c)
    assert all(torch.isfinite(torch.tensor(watch.losses)))


def test_dmd2_control_only_student_and_accumulation(tmp_path):
    module, watch = (
        dmd2(tmp_path, student_trainable="control", micro_batches=2, gan=GANSpec(weight=0.0, critic_weight=0.0)),
        Watch(),
    )
    watch_gan = module.gan
    tr = trainer(3, [watch])
    tr.fit(module, loader(6, 2))
    assert module.gan_head is None and watch_gan.weight == 0
    assert tr.global_step == 3 and len(watch.changes) == 6  # two batches per turn
    first = watch.changes[:2]  # turn 0: a student turn; parameters move at its second batch only
    assert not first[0]["student"] and first[1]["student"] and not first[1]["student_base"]
    assert sum(torch.numel(p) for p in module.student.parameters() if p.requires_grad) == sum(
        torch.numel(p) for p in module.student.controls.parameters()
    )


def gan(features: str) -> GANSpec:
    return GANSpec(weight=0.1, critic_weight=0.1, taps=(1,), hidden=32, features=features)


@pytest.mark.parametrize("features", ["fake_score", "teacher"])
def test_dmd2_resume_gives_the_same_losses(tmp_path, features):
    # epochs of 3 batches: the checkpoint at turn 3 is an epoch end (a plain DataLoader restarts
    # its epoch on resume), and turns 3..4 span a student turn (3) and a critic turn (4)
    full = Watch()
    trainer(5, [full]).fit(dmd2(tmp_path / "a", gan=gan(features)), loader(3, 2))
    # the frozen teacher stays bitwise unchanged on every turn, whichever trunk the head reads;
    # the head moves on critic turns only
    assert [c["teacher"] for c in full.changes] == [False] * 5
    assert [c["gan_head"] for c in full.changes] == [False, True, True, False, True]
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    first = Watch()
    trainer(3, [first, ckpt], enable_checkpointing=True).fit(dmd2(tmp_path / "b", gan=gan(features)), loader(3, 2))
    path = next((tmp_path / "ckpt").glob("*step=3*"))
    rest = Watch()
    trainer(5, [rest], default_root_dir=tmp_path).fit(
        dmd2(tmp_path / "b", gan=gan(features)), loader(3, 2), ckpt_path=path
    )
    assert full.losses[:3] == first.losses
    torch.testing.assert_close(torch.tensor(rest.losses), torch.tensor(full.losses[3:]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("features", ["fake_score", "teacher"])
def test_dmd2_gan_gradients_reach_the_head_and_the_trunk_it_reads(tmp_path, features):
    """Through the stage's own turn inputs and discriminator: the generator's GAN loss reaches the
    head and the student, plus the fake score when the head reads its trunk; on the teacher's
    trunk nothing of the teacher is trained (its weights require no grad and get none). The
    discriminator loss on a detached sample reaches the head (and the fake score it reads)."""
    from modules import distill, flow

    module = dmd2(tmp_path, gan=gan(features))
    module.configure_model()
    batch = next(iter(loader(1, 2)))
    _, cond, d = module.turn_inputs(batch, turn=0, micro=0)
    disc = module.disc_fn(cond)
    nets = {n: list(getattr(module, n).parameters()) for n in ("student", "fake_score", "gan_head")}
    assert all(p.requires_grad for ps in nets.values() for p in ps)
    assert not any(p.requires_grad for p in module.teacher.parameters())

    def reached(loss: torch.Tensor) -> set[str]:
        flat = [p for ps in nets.values() for p in ps]
        grads = iter(torch.autograd.grad(loss, flat, allow_unused=True, retain_graph=True))
        hit = {n: [g is not None and bool(g.abs().sum()) for g in (next(grads) for _ in ps)] for n, ps in nets.items()}
        return {n for n, flags in hit.items() if any(flags)}

    trunk = {"fake_score"} if features == "fake_score" else set()
    x_gen = flow.add_noise(module.student_sample(cond, d["noise"], 0, 0), d["eps"], d["t"])
    assert reached(distill.gan_generator_loss(disc(x_gen, d["t"])).mean()) == {"student", "gan_head"} | trunk
    x_real = flow.add_noise(batch["latent"], d["eps_data"], d["t_data"])
    critic = distill.gan_discriminator_loss(disc(x_real, d["t_data"]), disc(x_gen.detach(), d["t"])).mean()
    assert reached(critic) == {"gan_head"} | trunk
    # a whole student turn's backward leaves the teacher without gradients
    module.turn_loss(batch, 0, 0, student=True)[0].mean().backward()
    assert all(p.grad is None for p in module.teacher.parameters())


def test_dmd2_weights_the_control_by_the_batch_mask(tmp_path):
    """A batch `mask` (shards' mask.mp4) is the control's weight map for every network of a turn,
    as mask_path is in inference: all ones is the unmasked turn exactly, all zeros the turn
    without the control, half a mask neither."""
    module = dmd2(tmp_path)
    module.configure_model()
    batch = next(iter(loader(1, 2)))
    frames, size = 3, 16  # the pixel clip of LATENT (pixel tokenizer, spatial 4)
    ones = torch.ones(2, 1, frames, size, size)
    half = ones.clone()
    half[..., size // 2 :] = 0

    _, cond, _ = module.turn_inputs(batch | {"mask": half}, 0, 0)  # what teacher, student and fake score see
    assert torch.equal(cond.control_weights["edge"], half)

    def loss(b: dict) -> torch.Tensor:  # a critic turn: the student's sample and the fake score
        return module.turn_loss(b, 0, 0, student=False)[0].detach()

    plain = loss(batch)
    assert torch.equal(loss(batch | {"mask": ones}), plain)
    zero = loss(batch | {"mask": torch.zeros_like(ones)})
    module.modality = None  # the same turn, the control branch left out
    assert torch.equal(zero, loss(batch))
    module.modality = "edge"
    halved = loss(batch | {"mask": half})
    assert not torch.equal(halved, plain) and not torch.equal(halved, zero)


# --------------------------------------------------------------------------------------------
# KD warmup
# --------------------------------------------------------------------------------------------


def kd_batch(n: int = 2, times=(1.0, 0.9375, 0.8333333, 0.625)) -> dict:
    g = torch.Generator().manual_seed(3)
    return {
        "kd_noise": torch.randn(n, *LATENT, generator=g),
        "kd_states": torch.randn(n, len(times), *LATENT, generator=g),
        "kd_t": torch.tensor([list(times)] * n),
        "latent": torch.randn(n, *LATENT, generator=g),
        "control_latent": torch.randn(n, *LATENT, generator=g),
        "text_emb": torch.randn(n, 6, 32, generator=g),
        "text_mask": torch.ones(n, 6, dtype=torch.bool),
        "fps": torch.full((n,), 24.0),
    }


def test_kd_inputs_are_the_saved_states(tmp_path):
    student = NetSpec(init_from=teacher_dir(tmp_path / "t"))
    batch = kd_batch()
    one = KDWarmup(student, t_list=(1.0,), **NO_IO)
    x, t = one.inputs(batch, step=0)
    assert torch.equal(x, batch["kd_noise"]) and torch.equal(t, torch.ones(2))
    four = KDWarmup(student, **NO_IO)
    seen = set()
    for step in range(8):
        x, t = four.inputs(batch, step)
        for i in range(2):
            k = [round(v, 4) for v in batch["kd_t"][i].tolist()].index(round(float(t[i]), 4))
            assert torch.equal(x[i], batch["kd_states"][i, k])
            seen.add(k)
    assert seen == {0, 1, 2, 3}  # every t_k is drawn
    with pytest.raises(ValueError, match="t_list"):
        KDWarmup(student, t_shift=3.0, **NO_IO).inputs(batch, 0)


def test_kd_accumulation_equals_one_large_batch(tmp_path):
    """Accumulating 2 micro-batches of 2 equals one batch of 4: sample i of micro-batch m draws
    its t_k from the stream of its global index (m * b + i), as in ControlTraining."""
    teacher = teacher_dir(tmp_path / "t")
    samples = [{k: v[i] for k, v in kd_batch(8).items()} for i in range(8)]  # 2 steps x 4 samples

    def fit(batch_size: int, accumulate: int) -> dict:
        module = KDWarmup(NetSpec(init_from=teacher), optim=OptimSpec(lr=3e-3, warmup_steps=1), **NO_IO)
        tr = trainer(2, accumulate_grad_batches=accumulate)
        tr.fit(module, torch.utils.data.DataLoader(samples, batch_size=batch_size, shuffle=False))
        assert tr.global_step == 2
        return state(module.model)

    acc, big = fit(2, 2), fit(4, 1)
    assert any(not torch.equal(acc[k], v) for k, v in state(Denoiser.from_pretrained(teacher)).items())
    for k in big:
        torch.testing.assert_close(acc[k], big[k], atol=1e-6, rtol=1e-5)


def test_kd_warmup_fits_the_teacher_targets(tmp_path):
    module = KDWarmup(
        NetSpec(init_from=teacher_dir(tmp_path / "t")),
        optim=OptimSpec(lr=3e-3, warmup_steps=1),
        options=replace(NO_IO["options"], export_to=str(tmp_path / "student")),
    )
    batch = kd_batch(4)
    module.configure_model()
    before = float(module.loss(batch, step=0))
    trainer(30).fit(module, torch.utils.data.DataLoader([batch] * 30, batch_size=None))
    after = float(module.loss(batch, step=0))
    assert after < 0.7 * before, (before, after)
    exported = Denoiser.from_pretrained(tmp_path / "student")
    assert set(exported.controls) == {"edge"}
    # generation.json tells infer to sample the student's t-list
    from modules.sampling import GenerationSettings

    sampler = GenerationSettings.load(tmp_path / "student").sampler_config()
    assert sampler.sampler == "student" and sampler.t_list == tuple(module.sampler.t_list)


# --------------------------------------------------------------------------------------------
# make-kd-data
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kd_data(tmp_path_factory):
    from datamodules.synthetic import write_synthetic_shards
    from tools.make_kd_data import make_kd_data

    d = tmp_path_factory.mktemp("kd")
    write_synthetic_shards(
        str(d / "src"),
        num_samples=3,
        samples_per_shard=2,
        num_frames=4,
        height=32,
        width=32,
        controls=(),
        progress=False,
        floors=("plain",),
    )
    teacher = teacher_dir(d / "teacher", channels=12)
    kw = dict(
        teacher=teacher,
        shards=str(d / "src"),
        num_frames=4,
        height=32,
        width=32,
        tokenizer_options={"spatial": 2},
        max_length=16,
        steps=6,
        guidance=1.0,
        shift=3.0,
        t_shift=3.0,
        samples_per_shard=2,
        progress=False,
    )
    make_kd_data(out=str(d / "kd"), batch_size=2, **kw)
    return d, kw


def test_kd_data_reads_back_as_the_teacher_made_it(kd_data):
    from datamodules.controls import compute_control
    from datamodules.video import VideoDataModule
    from modules import flow
    from modules.sampling import Sampler, SamplerConfig, to_unit
    from modules.text import TextEncoder
    from modules.tokenizer import build_tokenizer

    d, kw = kd_data
    dm = VideoDataModule(
        str(d / "kd"),
        str(d / "kd"),
        batch_size=3,
        num_workers=0,
        num_frames=4,
        height=32,
        width=32,
        use_kd=True,
        use_text_embeddings=True,
        val_samples=3,
    )
    dm.setup("validate")
    b = next(iter(dm.val_dataloader()))
    times = flow.student_t_list((1.0, 0.75, 0.5, 0.25), 3.0)
    assert b["kd_states"].shape == (3, 4, 12, 4, 16, 16) and torch.allclose(b["kd_t"][0], torch.tensor(times))
    assert torch.equal(b["kd_states"][:, 0], b["kd_noise"])  # t = 1 is the noise itself
    src = VideoDataModule(
        str(d / "src"), str(d / "src"), batch_size=3, num_workers=0, num_frames=4, height=32, width=32, val_samples=3
    )
    src.setup("validate")
    s = next(iter(src.val_dataloader()))
    assert b["key"] == s["key"] and b["caption"] == s["caption"]
    for i in range(3):  # the exact control: Canny at the medium preset of the clip's pixels
        edge = compute_control("edge", s["video"][i].permute(1, 2, 3, 0).numpy(), preset="medium")
        assert torch.equal(b["control"][i], torch.from_numpy(edge).permute(3, 0, 1, 2))
    # the teacher again, on sample 0's noise: the same trajectory end and states
    net = Denoiser.from_pretrained(kw["teacher"])
    tok = build_tokenizer("pixel", spatial=2)
    emb, mask = TextEncoder.tiny(max_length=16).encode(s["caption"][:1])
    assert torch.equal(emb, b["text_emb"][:1])
    cond = Cond(
        text=emb,
        text_mask=mask,
        neg_text=torch.zeros_like(emb),
        neg_text_mask=torch.ones_like(mask),
        controls={"edge": tok.encode(to_unit(b["control"][:1]))},
        fps=float(s["fps"][0]),
    )
    seen = {}
    x0 = Sampler(net).sample(
        cond,
        b["kd_noise"][:1],
        SamplerConfig(steps=6, guidance=1.0, shift=3.0),
        through=times,
        on_state=lambda t, x: seen.__setitem__(t, x),
    )
    torch.testing.assert_close(x0, b["latent"][:1], atol=1e-5, rtol=0)
    for k, t in enumerate(times):
        torch.testing.assert_close(seen[t], b["kd_states"][:1, k], atol=1e-5, rtol=0)


def test_kd_data_resumes_and_splits_over_ranks(kd_data, monkeypatch):
    from datamodules.shards import expand_shards
    from datamodules.writer import tar_keys
    from tools.make_kd_data import make_kd_data

    d, kw = kd_data
    mtimes = {p: p.stat().st_mtime_ns for p in (d / "kd").glob("*.tar")}
    make_kd_data(out=str(d / "kd"), batch_size=2, **kw)  # everything is there: nothing rewritten
    assert {p: p.stat().st_mtime_ns for p in (d / "kd").glob("*.tar")} == mtimes
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        make_kd_data(out=str(d / "kd2"), batch_size=1, **kw)
    urls = expand_shards(str(d / "kd2"))
    assert sorted(os.path.basename(os.path.dirname(u)) for u in urls) == ["rank000", "rank001"]
    keys = [k for u in urls for k in tar_keys(u)]
    assert sorted(keys) == sorted(k for u in expand_shards(str(d / "kd")) for k in tar_keys(u))
