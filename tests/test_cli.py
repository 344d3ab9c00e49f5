"""The `vidistill` command end to end on tiny inputs."""

import json
import re

import pytest
import torch

from modules.denoiser import Cond, Denoiser
from tests.test_parity import make_diffusers
from tools.cli import main


def test_import_weights_command(tmp_path, capsys):
    tr, cn = make_diffusers("A", tmp_path)
    main(["import-weights", str(tmp_path), str(tmp_path / "out"), "--modality", "depth", "--dtype", "float32"])
    assert "imported" in capsys.readouterr().out
    model = Denoiser.from_pretrained(tmp_path / "out")
    assert list(model.controls) == ["depth"]
    x, text = torch.randn(1, 4, 2, 4, 4), torch.randn(1, 3, 24)
    with torch.no_grad():
        ref = tr(
            hidden_states=x,
            timestep=torch.tensor([0.5]),
            encoder_hidden_states=text,
            condition_mask=torch.zeros(1, 1, 2, 4, 4),
            padding_mask=torch.zeros(1, 1, 4, 4),
            return_dict=False,
        )[0]
        got = model.velocity(x, torch.tensor([0.5]), Cond(text=text))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_import_weights_bad_input_is_one_line(tmp_path):
    with pytest.raises(SystemExit) as err:
        main(["import-weights", str(tmp_path / "nowhere"), str(tmp_path / "out")])
    assert "config.json" in str(err.value) and "error" in str(err.value)


@pytest.mark.usefixtures("one_thread")
def test_bench_smoke_on_cpu(capsys, monkeypatch):
    # the peer eager, then with every block compiled (aot_eager: Dynamo and AOTAutograd, without
    # inductor's minutes of C++ code generation); ratios against the compiled peer
    from torch._dynamo.utils import counters

    import tools.bench.net as net

    built = []

    class Peer(net.Diffusers):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(net, "Diffusers", Peer)
    # a compiled version past the limit would run eagerly unnoticed: make it an error
    monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", True)
    limit = torch._dynamo.config.recompile_limit
    counters.clear()
    main(
        [
            "bench",
            "--preset",
            "tiny",
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--shapes",
            "2x4x4",
            "--steps",
            "1",
            "--peer",
            "diffusers",
            "--peer_compile_backend",
            "aot_eager",
        ]
    )
    out = capsys.readouterr().out
    assert json.loads(out.splitlines()[0])["peer_recompile_limit"] == 64
    assert torch._dynamo.config.recompile_limit == limit  # restored after the peer
    rows = [json.loads(line) for line in out.splitlines() if line.startswith('{"impl"')]
    assert [(r["impl"], r["variant"], r["compiled"]) for r in rows] == [
        ("diffusers", "diffusers eager (full checkpointing)", False),
        ("diffusers", "diffusers compiled (full checkpointing)", True),
        ("vidistill", "ckpt=full attn=auto compile=0", False),
    ]
    assert all(r["train_step_s"] > 0 and r["infer_fwd_s"] > 0 and r["tokens"] == 8 for r in rows)
    (peer,) = built
    blocks = [*peer.tr.transformer_blocks, *peer.cn.control_blocks]
    assert len(blocks) == 4 + 2 and all(b._compiled_call_impl is not None for b in blocks)
    assert counters["stats"]["unique_graphs"] > 0
    ratio = r"\d+\.\d\dx \(vs eager \d+\.\d\dx\)"
    assert re.search(
        rf"2x4x4 \[ckpt=full attn=auto compile=0\]: vs diffusers compiled: train {ratio}, inference {ratio}$", out, re.M
    )


def test_the_spellings_the_docs_show_work(tmp_path, monkeypatch):
    """Dashed flags and bare switches (`--from-scratch`, `--keep-going`) on every subcommand but
    fit / validate (LightningCLI's), as the README spells them."""
    import functools
    import inspect
    import re
    from pathlib import Path

    import tools.quickstart
    from tools.cli import COMMANDS, _load

    called = []
    original = tools.quickstart.quickstart
    monkeypatch.setattr(tools.quickstart, "quickstart", functools.wraps(original)(lambda **kw: called.append(kw)))
    for argv, scratch in (([], False), (["--from-scratch"], True), (["--from-scratch", "false"], False)):
        main(["quickstart", "--out", str(tmp_path), *argv, "--budget", "smoke"])
        assert called.pop()["from_scratch"] is scratch, argv
    main(["quickstart", "--budget", "smoke", "--from-scratch"])  # a switch last
    assert called.pop()["from_scratch"] is True
    # every dashed flag the README shows on a `vidistill` command names an argument of it
    docs = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for command, flag in re.findall(r"vidistill ([a-z-]+)[^\n`]*?--([a-z]+(?:-[a-z]+)+)", docs):
        if command in COMMANDS:
            assert flag.replace("-", "_") in inspect.signature(_load(COMMANDS[command])).parameters, (command, flag)
