"""The performance switches (activation-checkpointing modes, per-block torch.compile) and the bench's
`--variants`: none may change what is computed, only when and how.

CPU, tiny preset, fp32, fixed seed. Checkpointing modes must give bit-identical loss and gradients.
torch.compile is checked with the aot_eager backend (Dynamo + AOTAutograd, the checkpointed region
traced as the compiler sees it, no code generation): inductor's C++ code generation takes over a
minute on two CPU cores, so the inductor kernels themselves are only exercised by the GPU bench.
"""

import pytest
import torch

from modules.denoiser import Cond, Denoiser
from modules.nets import preset
from modules.nets.dit import checkpoint_plan
from modules.parallel import ShardingConfig, blocks_in_order, set_compile, shard_model
from tools.bench.common import Variant, parse_variants

pytestmark = pytest.mark.usefixtures("one_thread")


def model_and_batch():
    cfg = preset("tiny")
    torch.manual_seed(0)
    model = Denoiser.build(cfg, device="cpu", dtype=torch.float32)
    model.net.requires_grad_(False)  # the control-training setting the bench measures
    for proj in model.controls["edge"].after_proj:  # zero-init would hide wrong control gradients
        proj.weight.data.normal_(0, 0.1)
    g = torch.Generator().manual_seed(1)
    C = cfg.dit.latent_channels
    x, ctrl = torch.randn(2, C, 2, 4, 4, generator=g), torch.randn(2, C, 2, 4, 4, generator=g)
    cond = Cond(text=torch.randn(2, 5, cfg.dit.text_dim, generator=g), controls={"edge": ctrl})
    return model, x, cond


def loss_and_grads(model, x, cond):
    model.zero_grad(set_to_none=True)
    loss = model.velocity(x, torch.tensor([0.3, 0.7]), cond).square().mean()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


def test_checkpoint_plan_modes():
    assert checkpoint_plan("none", 3) == checkpoint_plan(False, 3) == checkpoint_plan("false", 3) == [False] * 3
    assert checkpoint_plan("full", 2) == checkpoint_plan(True, 2) == checkpoint_plan("true", 2) == [True] * 2
    assert checkpoint_plan("selective", 2) == ["selective"] * 2
    assert checkpoint_plan("partial:2", 4) == [True, True, False, False]
    assert checkpoint_plan("partial:1:selective", 3) == [True, "selective", "selective"]
    assert checkpoint_plan("attention", 2) == checkpoint_plan("partial:0:attention", 2) == ["attention"] * 2
    assert checkpoint_plan("partial:9", 2) == [True, True]
    for bad in ("fulll", "partial", "partial:x", "partial:2:full", "partial:2:none:x", "attention:2"):
        with pytest.raises(ValueError, match="checkpointing mode"):
            checkpoint_plan(bad, 4)
    with pytest.raises(ValueError, match="sharding.checkpointing"):
        ShardingConfig(checkpointing="partial:-1")


@pytest.mark.parametrize("mode", ["full", "selective", "attention", "partial:3", "partial:2:selective"])
def test_checkpointing_modes_keep_loss_and_grads(mode):
    model, x, cond = model_and_batch()
    ref_loss, ref_grads = loss_and_grads(model, x, cond)
    shard_model(model, None, ShardingConfig(checkpointing=mode))
    plan = [b.checkpoint for b in blocks_in_order(model)]
    assert plan == checkpoint_plan(mode, len(plan))
    loss, grads = loss_and_grads(model, x, cond)
    assert torch.equal(loss, ref_loss)
    assert len(grads) == len(ref_grads) > 0
    for a, b in zip(grads, ref_grads):
        assert torch.equal(a, b)


def test_compile_option_is_wired_and_keeps_numerics():
    model, x, cond = model_and_batch()
    shard_model(model, None, ShardingConfig(compile=True))
    assert {b.compile_backend for b in blocks_in_order(model)} == {"inductor"}
    set_compile(model, False)
    ref_loss, ref_grads = loss_and_grads(model, x, cond)
    with torch.no_grad():
        ref_out = model.velocity(x, torch.tensor([0.3, 0.7]), cond)
    # partial checkpointing: compiled blocks with and without a checkpointed region
    shard_model(model, None, ShardingConfig(checkpointing="partial:3"))
    set_compile(model, True, backend="aot_eager")
    loss, grads = loss_and_grads(model, x, cond)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(model.velocity(x, torch.tensor([0.3, 0.7]), cond), ref_out, rtol=1e-5, atol=1e-6)


def test_bench_variants_parse():
    base = Variant(checkpointing="full", attention_backend="cudnn")
    v = parse_variants("checkpointing=partial:20,infer=false; compile=true ;", base)
    assert v == [Variant("partial:20", False, "cudnn", False), Variant("full", True, "cudnn", True)]
    assert parse_variants(None, base) == []
    with pytest.raises(ValueError, match="key=value"):
        parse_variants("ckpt=full", base)


def test_bench_runs_variants_and_profiles(tmp_path, capsys):
    # the peer's side of the table is covered by test_cli's bench smoke test
    from tools.bench import bench

    rows = bench(
        preset="tiny",
        device="cpu",
        dtype="float32",
        shapes="2x4x4",
        steps=1,
        checkpointing="attention",
        infer=False,
        profile=str(tmp_path),
        variants="checkpointing=partial:2:selective,shapes=2x2x2+2x4x4,profile=false",
    )
    assert [(r["variant"], r["shape"]) for r in rows] == [
        ("ckpt=attention attn=auto compile=0", "2x4x4"),
        ("ckpt=partial:2:selective attn=auto compile=0", "2x2x2"),
        ("ckpt=partial:2:selective attn=auto compile=0", "2x4x4"),
    ]
    assert all(r["infer_fwd_s"] is None and r["train_step_s"] > 0 for r in rows)
    assert [p.name for p in tmp_path.iterdir()] == ["vidistill_2x4x4_ckpt_attention_attn_auto_compile_0.txt"]
    assert "| 2x2x2 | vidistill | ckpt=partial:2:selective" in capsys.readouterr().out


def test_bench_table_ratios_against_the_compiled_peer():
    from tools.bench.net import format_table

    def row(impl, compiled, train, infer, shape="720p_93f", error=None):
        variant = f"diffusers {'compiled' if compiled else 'eager'}" if impl == "diffusers" else "ours"
        return dict(
            impl=impl,
            variant=variant,
            compiled=compiled,
            shape=shape,
            error=error,
            train_step_s=train,
            train_peak_GiB=1.0,
            train_mfu=None,
            infer_fwd_s=infer,
            infer_peak_GiB=1.0,
            infer_mfu=None,
        )

    rows = [row("diffusers", False, 4.0, 2.0), row("diffusers", True, 3.0, 1.5), row("vidistill", True, 2.0, 1.0)]
    out = format_table(rows)
    assert (
        "720p_93f [ours]: vs diffusers compiled: train 1.50x (vs eager 2.00x), inference 1.50x (vs eager 2.00x)" in out
    )
    # the compiled peer ran out of memory: the ratios fall back to the eager peer, and say so
    rows[1] = row("diffusers", True, None, None, error="out of memory: CUDA out of memory")
    assert (
        "720p_93f [ours]: vs diffusers eager (compiled peer: out of memory: CUDA out of memory): train 2.00x, "
        "inference 2.00x" in format_table(rows)
    )
    assert "vs diffusers" not in format_table(rows[2:])  # no peer, no speed-up line
