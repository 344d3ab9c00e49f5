"""`vidistill quickstart` end to end at the smoke budget (a few steps per stage, --from-scratch so
the base and edge stages run too): every stage's artifact, a report whose media decode, finite
metrics of every compared model, a consolidated student equal to the trained one; and the
shipped teacher installed in their place by default."""

import json
import math
import os

import pytest
import torch

from datamodules.codec import decode_video
from modules.denoiser import Cond, Denoiser
from modules.nets import SparseAttention
from tools.quickstart import RUNS, RUNS_TO_COMPARE, quickstart


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart")
    report = quickstart(out=str(out), budget="smoke", from_scratch=True, seed=3)
    return out, report


def test_every_stage_wrote_its_artifact(run):
    out, report = run
    runs = out / RUNS
    for stage in ("base", "edge", "blur", "kd", "dmd2", "kd_sparse", "dmd2_sparse"):
        assert (runs / stage / "export" / "model.safetensors").is_file(), stage
        assert (runs / stage / "export" / "generation.json").is_file(), stage
    assert list((runs / "kd" / "train").rglob("*.tar")) and list((runs / "kd" / "val").rglob("*.tar"))
    assert (runs / "dmd2" / "consolidated" / "student" / "model.safetensors").is_file()
    # only the sparse student is sparse: its consolidated config carries the recipe's attention
    sparse = Denoiser.config_from(runs / "dmd2_sparse/consolidated/student").dit.sparse
    assert sparse == SparseAttention("topk", (1, 4, 4), keep=8)
    assert Denoiser.config_from(runs / "dmd2/consolidated/student").dit.sparse is None
    assert set(Denoiser.config_from(runs / "teacher_edge_vis").modalities) == {"edge", "blur"}
    for folder, *_ in RUNS_TO_COMPARE:
        assert len(list((runs / "out" / folder).glob("*.json"))) == 2, folder
    state = json.loads((out / "quickstart.json").read_text())
    assert list(state["stages"]) == [
        "data",
        "base",
        "edge",
        "blur",
        "kd_data",
        "kd",
        "dmd2",
        "consolidate",
        "kd_sparse",
        "dmd2_sparse",
        "consolidate_sparse",
        "combine",
        "specs",
        "infer",
        "evaluate",
    ]
    assert report.is_file() and state["seed"] == 3
    assert json.loads((runs / "specs/edge.jsonl").read_text().splitlines()[0])["seed"] == 3 * 1_000_003
    # the in-process Lightning runs leave no process group or launcher variables behind
    assert not torch.distributed.is_initialized() and "MASTER_PORT" not in os.environ


def test_report_media_decode_with_the_requested_frames(run):
    out, report = run
    page = report.read_text()
    videos = [part.split('"')[0] for part in page.split('<video src="')[1:]]
    assert len(videos) == 2
    for src in videos:
        frames, _ = decode_video((out / src).read_bytes())
        assert len(frames) == 4, src
    assert page.count("<svg") >= 6  # the metrics chart and a loss chart per training stage


def test_every_metric_is_finite(run):
    out, _ = run
    metrics = json.loads((out / RUNS / "eval" / "metrics.json").read_text())
    assert [r["label"] for r in metrics["runs"]] == [
        "control-free base (35 steps)",
        "teacher (35 steps)",
        "KD student (4 steps)",
        "DMD2 student (4 steps)",
        "DMD2 student (1 step)",
        "teacher, edge + vis (35 steps)",
        "DMD2 student, sparse attention (4 steps)",
    ]
    assert "1/3 of the keys" in metrics["runs"][-1]["source"]  # the report says how sparse
    for r in metrics["runs"]:
        scores = [r[k] for k in ("shape_iou", "psnr", "edge_f1")] + [r[f"{k}_std"] for k in ("shape_iou", "psnr")]
        values = scores + [r["nfe"], r["seconds"], r["speedup"]] + ([r["blur_ssim"]] if "blur_ssim" in r else [])
        assert all(math.isfinite(v) for v in values), r
        assert "trained in this run" in r["source"], r  # --from-scratch: no shipped network
    assert [r["nfe"] for r in metrics["runs"]] == [35, 35, 4, 4, 1, 35, 4]
    by_label = {r["label"]: r for r in metrics["runs"]}
    assert "blur_ssim" in by_label["teacher, edge + vis (35 steps)"]


def test_the_consolidated_student_is_the_trained_one(run):
    out, _ = run
    runs = out / RUNS
    live = Denoiser.from_pretrained(runs / "dmd2" / "export")  # written from the live model at the end of fit
    ckpt = Denoiser.from_pretrained(runs / "dmd2" / "consolidated" / "student")  # from the DCP checkpoint
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, live.cfg.dit.latent_channels, 2, 8, 8, generator=g)
    cond = Cond(
        text=torch.randn(1, 4, live.cfg.dit.text_dim, generator=g), controls={"edge": torch.randn(x.shape, generator=g)}
    )
    with torch.no_grad():
        assert torch.equal(live.denoise(x, 0.7, cond), ckpt.denoise(x, 0.7, cond))


def test_a_rerun_skips_finished_stages(run, capsys):
    out, _ = run
    before = json.loads((out / "quickstart.json").read_text())["stages"]
    quickstart(out=str(out), budget="smoke", from_scratch=True, seed=3)
    printed = capsys.readouterr().out
    for stage in ("base", "edge", "blur", "kd", "dmd2", "consolidate", "combine"):
        assert f"[quickstart] {stage}: done already" in printed, stage
    assert "[quickstart] infer ..." in printed  # stages without one artifact run again
    after = json.loads((out / "quickstart.json").read_text())["stages"]
    assert after["base"] == before["base"] and after["dmd2"] == before["dmd2"]


def test_cuda_runs_the_same_recipes_longer(tmp_path, monkeypatch):
    """--device cuda: the same recipes on a GPU, with more steps for the in-run stages."""
    import yaml

    from tools.quickstart import BUDGETS, training_config

    monkeypatch.chdir(tmp_path)
    gpu, cpu = BUDGETS["cuda"]["full"], BUDGETS["cpu"]["full"]
    kd = yaml.safe_load(training_config("kd", gpu.kd_steps, "cuda", seed=5).read_text())
    assert kd["trainer"]["accelerator"] == "gpu" and kd["trainer"]["max_steps"] == gpu.kd_steps
    assert kd["model"]["init_args"]["options"]["seed"] == 5 and kd["seed_everything"] == 5
    on_cpu = yaml.safe_load(training_config("kd", cpu.kd_steps, "cpu").read_text())
    assert on_cpu["trainer"]["accelerator"] == "cpu"
    assert on_cpu["data"] == kd["data"]  # same clips
    assert gpu.kd_steps >= 5 * cpu.kd_steps and gpu.dmd2_turns >= 5 * cpu.dmd2_turns


def test_the_shipped_teacher_replaces_the_base_and_edge_stages(tmp_path, monkeypatch):
    """By default the base and edge stages are the shipped teacher: its directory as the edge
    export, its base split off it as the base export (the teacher's base weights exactly)."""
    from safetensors.torch import load_file

    from modules.pretrained import shipped
    from tools.quickstart.stages import install_shipped

    monkeypatch.chdir(tmp_path)
    install_shipped()
    teacher = load_file(shipped("quickstart-edge") / "model.safetensors")
    edge = load_file(RUNS / "edge/export/model.safetensors")
    base = load_file(RUNS / "base/export/model.safetensors")
    assert edge.keys() == teacher.keys() and all(torch.equal(edge[k], teacher[k]) for k in teacher)
    assert base.keys() == {k for k in teacher if k.startswith("net.")}
    assert all(torch.equal(base[k], teacher[k]) for k in base)
    assert Denoiser.config_from(RUNS / "base/export").modalities == []
    assert Denoiser.config_from(RUNS / "edge/export").modalities == ["edge"]
