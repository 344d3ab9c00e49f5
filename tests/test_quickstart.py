"""`vidistill quickstart` end to end at the smoke budget (a few steps per stage): every stage's
artifact, a report whose media decode, a consolidated student equal to the trained one."""

import json
import math
import os

import pytest
import torch

from datamodules.codec import decode_video
from modules.denoiser import Cond, Denoiser
from tools.quickstart import RUNS, RUNS_TO_COMPARE, quickstart


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart")
    report = quickstart(out=str(out), budget="smoke")
    return out, report


def test_every_stage_wrote_its_artifact(run):
    out, report = run
    runs = out / RUNS
    for stage in ("base", "edge", "blur", "kd", "dmd2"):
        assert (runs / stage / "export" / "model.safetensors").is_file(), stage
        assert (runs / stage / "export" / "generation.json").is_file(), stage
    assert list((runs / "kd" / "train").rglob("*.tar")) and list((runs / "kd" / "val").rglob("*.tar"))
    assert (runs / "dmd2" / "consolidated" / "student" / "model.safetensors").is_file()
    assert set(Denoiser.config_from(runs / "teacher_edge_vis").modalities) == {"edge", "blur"}
    for folder, _, _, _ in RUNS_TO_COMPARE:
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
        "combine",
        "specs",
        "infer",
        "evaluate",
    ]
    assert report.is_file()
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
    assert [r["label"] for r in metrics["runs"]] == [label for _, label, _, _ in RUNS_TO_COMPARE]
    for r in metrics["runs"]:
        values = [r["edge_f1"], r["nfe"], r["seconds"], r["speedup"]] + ([r["blur_ssim"]] if "blur_ssim" in r else [])
        assert all(math.isfinite(v) for v in values), r
    assert "blur_ssim" in metrics["runs"][-1]  # the edge + vis teacher


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
    quickstart(out=str(out), budget="smoke")
    printed = capsys.readouterr().out
    for stage in ("base", "edge", "blur", "kd", "dmd2", "consolidate", "combine"):
        assert f"[quickstart] {stage}: done already" in printed, stage
    after = json.loads((out / "quickstart.json").read_text())["stages"]
    assert after["base"] == before["base"] and after["dmd2"] == before["dmd2"]


def test_cuda_runs_the_same_recipes_longer(tmp_path, monkeypatch):
    """--device cuda: the same recipes on a GPU with about 10x the steps."""
    import yaml

    from tools.quickstart import BUDGETS, training_config

    monkeypatch.chdir(tmp_path)
    gpu, cpu = BUDGETS["cuda"]["full"], BUDGETS["cpu"]["full"]
    base = yaml.safe_load(training_config("base", gpu.base_steps, "cuda").read_text())
    assert base["trainer"]["accelerator"] == "gpu" and base["trainer"]["max_steps"] == gpu.base_steps
    assert base["model"]["init_args"]["optim"]["total_steps"] == gpu.base_steps
    on_cpu = yaml.safe_load(training_config("base", cpu.base_steps, "cpu").read_text())
    assert on_cpu["trainer"]["accelerator"] == "cpu"
    assert on_cpu["data"] == base["data"]  # same clips
    assert gpu.base_steps >= 10 * cpu.base_steps and gpu.control_steps >= 5 * cpu.control_steps
