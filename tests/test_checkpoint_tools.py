"""consolidate and combine on a real sharded checkpoint: a 2-process gloo run of
tests/helpers/train_worker.py (with EMA, an end-of-fit export and a ~70 MB network, see `worker`),
consolidated in a subprocess whose peak memory is measured."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modules.checkpoint import Checkpoint, network_config, read_meta
from modules.denoiser import Cond, Denoiser
from modules.sampling import Sampler, SamplerConfig
from tests.helpers import PATIENCE_S
from tools.cli import main

ROOT = Path(__file__).resolve().parents[1]
# wide enough that the exported network (71 MiB in fp32), not the interpreter, is what the memory
# bound measures; the 3x4x4 latents of tests/helpers/latents.py keep the steps cheap
NET = dict(dim=384, heads=6, depth=6)
EMA_DECAY = 0.9
# what the consolidate process imports besides the work: the allowance is this process's peak RSS
IMPORTS = (
    "import tools.cli, tools.consolidate, modules.checkpoint, jsonargparse, tqdm, safetensors.torch, "
    "torch.distributed.checkpoint"
)


def worker() -> None:
    """train_worker.py's run, with EMA, export_to and the wider network (python -m tests.test_checkpoint_tools)."""
    import runpy
    from dataclasses import replace

    from modules.stages import control_training
    from modules.stages.base import NetSpec

    out = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--out="))

    class WithEMA(control_training.ControlTraining):
        def __init__(self, **kwargs):
            kwargs["net"] = NetSpec("tiny", overrides=NET)
            kwargs["options"] = replace(kwargs["options"], ema_decay=EMA_DECAY, export_to=out + ".export")
            super().__init__(**kwargs)

    # train_worker imports ControlTraining from this module when it runs
    control_training.ControlTraining = WithEMA
    runpy.run_module("tests.helpers.train_worker", run_name="__main__")


# The peak RSS of a process is read by itself from /proc (VmHWM, the high-water mark of its own
# address space since exec). getrusage's ru_maxrss would not do: Linux carries over the RSS of the
# forking process (this pytest, with torch and the run's tensors loaded) into the child's maxrss.
REPORT_PEAK = "print('VmHWM', next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))"


def start(code: str, *args: str) -> subprocess.Popen:
    """`python -c code args` in a fresh interpreter that prints its peak RSS at the end."""
    return subprocess.Popen(
        [sys.executable, "-c", f"{code}\n{REPORT_PEAK}", *args],
        cwd=ROOT,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def peak_rss(proc: subprocess.Popen) -> int:
    """Wait for a `start`ed process; its peak RSS in bytes."""
    out, _ = proc.communicate(timeout=PATIENCE_S)
    peak = [line.split()[1] for line in out.splitlines() if line.startswith("VmHWM")]
    assert proc.returncode == 0 and peak, out[-3000:]
    return int(peak[-1]) * 1024


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpt_tools")
    allowance = start(IMPORTS)  # meanwhile: its peak does not depend on the load of the machine
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "tests.test_checkpoint_tools",
        f"--out={tmp / 'run'}",
        "--steps=2",
        f"--ckpt_dir={tmp / 'ckpt'}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=PATIENCE_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ckpt = next((tmp / "ckpt").glob("*step=2*"))
    rss = peak_rss(
        start(
            "import sys; from tools.cli import main; main(sys.argv[1:])",
            "consolidate",
            str(ckpt),
            "--out",
            str(tmp / "out"),
        )
    )
    return dict(
        tmp=tmp,
        ckpt=ckpt,
        out=tmp / "out",
        rss=rss,
        allowance=peak_rss(allowance),
        params=torch.load(f"{tmp / 'run'}.params.pt"),
        live=json.loads(Path(f"{tmp / 'run'}.rank0.json").read_text()),
    )


def nbytes(path: Path) -> int:
    return sum(t.numel() * t.element_size() for t in load_file(path / "model.safetensors").values())


def test_consolidate_equals_the_live_model(run):
    assert sorted(p.name for p in run["out"].iterdir()) == ["ema", "model"]
    meta = read_meta(run["ckpt"] / "meta.pt")  # unpickling its classes for real would import Lightning
    assert meta["global_step"] == run["live"]["global_step"] == 2  # checkpoint and params: the same step
    exported = load_file(run["out"] / "model" / "model.safetensors")
    assert exported.keys() == run["params"].keys()
    for k, v in run["params"].items():
        assert torch.equal(exported[k], v), k
    # the config rebuilt from the hyperparameters is the one the run built (export_to wrote it)
    assert Denoiser.config_from(run["out"] / "model") == Denoiser.config_from(f"{run['tmp'] / 'run'}.export")
    Denoiser.from_pretrained(run["out"] / "model")
    # consolidate writes the stage's generation.json, as the live export did
    assert (run["out"] / "model" / "generation.json").read_text() == (
        Path(f"{run['tmp'] / 'run'}.export") / "generation.json"
    ).read_text()
    # without Stage.on_save_checkpoint's net_configs / ema_of: rebuilt from the hyperparameters
    source = Checkpoint(run["ckpt"])
    source.meta.pop("net_configs", None), source.meta.pop("ema_of", None)
    assert network_config(source, "model") == Denoiser.config_from(run["out"] / "model")
    assert source.ema_target() == "model"


def test_consolidate_peak_memory(run):
    size = nbytes(run["out"] / "model")
    assert size > 60e6
    # measured on the 2-core CPU machine (torch 2.14.1, safetensors 0.8): allowance 556-560 MiB
    # (torch's import alone maps ~500 MiB of libraries), consolidate 644-663 MiB: 84-107 MiB above it,
    # 1.2-1.5x the 71 MiB network from run to run (allocator noise). 2x still fails a tool that holds
    # two full copies of the network at once (the DCP load and a state dict copied from it)
    print(
        f"peak RSS {run['rss'] / 2**20:.0f} MiB, allowance {run['allowance'] / 2**20:.0f} MiB, "
        f"network {size / 2**20:.0f} MiB"
    )
    assert run["rss"] - run["allowance"] <= 2.0 * size


def test_ema_export_equals_the_ema_buffers(run):
    ema = load_file(run["out"] / "ema" / "model.safetensors")
    live = load_file(Path(f"{run['tmp'] / 'run'}.export") / "model.safetensors")  # Stage.export: EMA applied
    assert ema.keys() == live.keys() == run["params"].keys()
    for k in live:
        assert torch.equal(ema[k], live[k]), k
    trained = [k for k in live if k.startswith("controls.")]
    assert any(not torch.equal(ema[k], run["params"][k]) for k in trained)  # the EMA is not the weights
    assert all(torch.equal(ema[k], run["params"][k]) for k in live if k.startswith("net."))  # frozen base
    assert Denoiser.config_from(run["out"] / "ema") == Denoiser.config_from(run["out"] / "model")


def linked_copy(src: Path, dst: Path, skip: str = "") -> Path:
    """The checkpoint directory with its files linked, not copied (meta.pt may then be rewritten)."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name != skip:
            (dst / f.name).symlink_to(f)
    return dst


def test_missing_shard_is_named(run, tmp_path):
    broken = linked_copy(run["ckpt"], tmp_path / "broken", skip="__1_0.distcp")
    with pytest.raises(SystemExit) as err:
        main(["consolidate", str(broken), "--out", str(tmp_path / "out")])
    assert "__1_0.distcp" in str(err.value) and "error" in str(err.value)
    with pytest.raises(SystemExit) as err:
        main(["consolidate", str(run["ckpt"]), "--out", str(tmp_path / "out"), "--networks", "[teacher]"])
    assert "teacher" in str(err.value) and "'model'" in str(err.value) and "'ema'" in str(err.value)


def test_saved_config_and_dtype(run, tmp_path):
    ckpt = linked_copy(run["ckpt"], tmp_path / "ckpt", skip="meta.pt")
    cfg = Denoiser.config_from(run["out"] / "model")
    cfg.use_text_mask, cfg.cond_frame_t = False, 0.25  # not visible in shapes: must come from net_configs
    # what Stage.on_save_checkpoint adds to meta.pt; no hyperparameters: the saved config is enough
    torch.save({"global_step": 2, "net_configs": {"model": cfg.to_dict()}}, ckpt / "meta.pt")
    main(["consolidate", str(ckpt), "--out", str(tmp_path / "out"), "--networks", "[model]", "--dtype", "bf16"])
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["model"]
    assert Denoiser.config_from(tmp_path / "out" / "model") == cfg
    exported = load_file(tmp_path / "out" / "model" / "model.safetensors")
    for k, v in run["params"].items():
        assert exported[k].dtype == torch.bfloat16 and torch.equal(exported[k], v.to(torch.bfloat16)), k


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_networks_of_any_stage(tmp_path):
    """A distillation-stage layout: every top-level Denoiser is found whatever its name, the GAN
    head is exported with its config, and the EMA goes with the student (same shapes as the teacher)."""
    import torch.distributed.checkpoint as dcp

    from modules.nets import preset

    cfgs = {"student": preset("tiny"), "teacher": preset("tiny"), "fake_score": preset("tiny")}
    cfgs["fake_score"].modalities = []
    nets = {name: Denoiser.build(cfg, seed=i) for i, (name, cfg) in enumerate(cfgs.items())}
    state = {f"{name}.{k}": v for name, net in nets.items() for k, v in net.state_dict().items()}
    from modules.nets.gan import GANHead, GANHeadConfig

    head = GANHead(GANHeadConfig(dim=64, taps=[1, 2], hidden=16)).init_weights(3)
    state.update({f"gan_head.{k}": v for k, v in head.state_dict().items()})
    ema = {k: v + 1 for k, v in nets["student"].state_dict().items() if k.startswith("controls.")}
    state.update({"ema." + k.replace(".", "__"): v for k, v in ema.items()})
    ckpt = tmp_path / "last.ckpt"
    dcp.save({"state_dict": state}, checkpoint_id=str(ckpt), no_dist=True)
    torch.save(
        {
            "global_step": 7,
            "net_configs": {n: c.to_dict() for n, c in cfgs.items()},
            "head_configs": {"gan_head": head.cfg.to_dict()},
        },
        ckpt / "meta.pt",
    )
    main(["consolidate", str(ckpt), "--out", str(tmp_path / "out")])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "ema",
        "fake_score",
        "gan_head",
        "student",
        "teacher",
    ]
    got = load_file(tmp_path / "out" / "gan_head" / "model.safetensors")
    assert got.keys() == head.state_dict().keys() and all(torch.equal(got[k], v) for k, v in head.state_dict().items())
    assert json.loads((tmp_path / "out" / "gan_head" / "config.json").read_text())["taps"] == [1, 2]
    for name, net in nets.items():
        loaded = Denoiser.from_pretrained(tmp_path / "out" / name)
        assert loaded.cfg == cfgs[name]
        assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in net.state_dict().items())
    exported = load_file(tmp_path / "out" / "ema" / "model.safetensors")
    expected = {**nets["student"].state_dict(), **ema}
    assert exported.keys() == expected.keys() and all(torch.equal(exported[k], v) for k, v in expected.items())
    with pytest.raises(SystemExit) as err:
        main(["consolidate", str(ckpt), "--out", str(tmp_path / "x"), "--networks", "[critic]"])
    assert "unknown network(s) ['critic']" in str(err.value)


def files_equal(a: Path, b: Path) -> bool:
    return all((a / f).read_bytes() == (b / f).read_bytes() for f in ("config.json", "model.safetensors"))


def test_combine_and_split_round_trip(run, tmp_path):
    teacher = run["out"] / "model"
    main(["combine", str(teacher), "--split", "true", "--out", str(tmp_path / "parts")])
    parts = tmp_path / "parts"
    assert sorted(p.name for p in parts.iterdir()) == ["base", "control_edge"]
    assert all(k.startswith("controls.edge.") for k in load_file(parts / "control_edge" / "model.safetensors"))
    Denoiser.from_pretrained(parts / "base")  # the base alone is a network
    main(["combine", str(parts / "base"), "--control", str(parts / "control_edge"), "--out", str(tmp_path / "joined")])
    assert files_equal(tmp_path / "joined", teacher)
    main(["combine", str(tmp_path / "joined"), "--split", "true", "--out", str(tmp_path / "again")])
    for part in ("base", "control_edge"):
        assert files_equal(tmp_path / "again" / part, parts / part)
    # a full network from control training as the control: only its branch is taken
    with_full = tmp_path / "from_full"
    main(["combine", str(parts / "base"), "--control", str(teacher), "--out", str(with_full)])
    assert files_equal(with_full, teacher)

    # the combined teacher samples exactly as the network of the run
    cfg = Denoiser.config_from(teacher)
    with torch.device("meta"):
        live = Denoiser(cfg)
    live.load_state_dict(run["params"], assign=True)
    g = torch.Generator().manual_seed(0)
    text = torch.randn(1, 6, cfg.dit.text_dim, generator=g)
    cond = Cond(text=text, neg_text=torch.zeros_like(text), controls={"edge": torch.randn(1, 48, 3, 4, 4, generator=g)})
    noise = torch.randn(1, 48, 3, 4, 4, generator=g)
    sampler = SamplerConfig(steps=2, guidance=3.0)
    expected = Sampler(live).sample(cond, noise, sampler)
    got = Sampler(Denoiser.from_pretrained(tmp_path / "joined")).sample(cond, noise, sampler)
    assert torch.equal(got, expected)


def test_combine_checks_the_base(run, tmp_path):
    parts = tmp_path / "parts"
    main(["combine", str(run["out"] / "model"), "--split", "true", "--out", str(parts)])
    other = Denoiser.config_from(parts / "base")
    other.dit.dim, other.dit.heads = 128, 4
    Denoiser.build(other).save_pretrained(tmp_path / "other")
    with pytest.raises(SystemExit) as err:
        main(
            ["combine", str(tmp_path / "other"), "--control", str(parts / "control_edge"), "--out", str(tmp_path / "x")]
        )
    assert "another base" in str(err.value) and "dim 384 vs 128" in str(err.value)
    # same shapes, other weights: a full control directory shows the base it was trained on
    shutil.copytree(parts / "base", tmp_path / "retrained")
    state = load_file(tmp_path / "retrained" / "model.safetensors")
    state["net.final.weight"] = state["net.final.weight"] + 1
    Denoiser.from_pretrained(parts / "base").save_pretrained(tmp_path / "retrained", state)
    with pytest.warns(UserWarning, match="different base"):
        main(
            [
                "combine",
                str(tmp_path / "retrained"),
                "--control",
                str(run["out"] / "model"),
                "--out",
                str(tmp_path / "y"),
            ]
        )
    with pytest.raises(SystemExit) as err:  # a branch the network already has
        main(
            [
                "combine",
                str(run["out"] / "model"),
                "--control",
                str(parts / "control_edge"),
                "--out",
                str(tmp_path / "z"),
            ]
        )
    assert "already has" in str(err.value)


if __name__ == "__main__":
    worker()
