"""Bad input, as a new user or a hostile tester gives it: every case exits non-zero with a message
of one line (or a few) naming the problem, and nothing is written or overwritten. Runs in-process
(`tools.cli.main`) on tiny shards and a tiny model."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers.reliability import SIZE, recipe, teacher, video_shards
from tools.cli import main


@pytest.fixture
def no_cuda(monkeypatch):
    """A machine without CUDA, on any machine (CI has none; a GPU host is told it has none)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def fails(argv: list, capsys) -> tuple[int | str, str]:
    """Run `vidistill ARGV`; the exit code (a string: status 1 with that message) and stderr."""
    with pytest.raises(SystemExit) as err:
        main([str(a) for a in argv])
    code = err.value.code
    assert code not in (0, None), "exited with status 0"
    return code, capsys.readouterr().err


def one_line(code, words: list[str]) -> str:
    message = str(code)
    assert message.startswith("vidistill ") and len(message.splitlines()) == 1, message
    assert "Traceback" not in message and all(w in message for w in words), message
    return message


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Tiny shards, an edge-only model (a distilled student's layout) and a decodable clip."""
    from datamodules.codec import write_video

    d = tmp_path_factory.mktemp("inputs")
    write_video(d / "input.mp4", np.full((4, SIZE, SIZE, 3), 90, np.uint8), 8.0)
    return {"dir": d, "shards": video_shards(d / "shards"), "model": teacher(d / "model")}


@pytest.fixture
def in_process():
    """An in-process Lightning run leaves a process group and launcher variables behind."""
    env = dict(os.environ)
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    os.environ.clear()
    os.environ.update(env)


# --- the command itself ------------------------------------------------------------------------------


def test_help_lists_fit_and_validate(capsys):
    with pytest.raises(SystemExit) as err:
        main(["--help"])
    assert err.value.code == 0
    out = capsys.readouterr().out
    for command in ("fit", "validate", "infer", "make-shards", "quickstart"):
        assert f"\n    {command} " in out, command


def test_an_error_is_printed_by_rank_zero_only(tmp_path, monkeypatch, capsys):
    """Under torchrun or srun every rank raises the same error: one message, not one per rank."""
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as err:
        main(["make-shards", "--src", str(tmp_path / "missing"), "--out", str(tmp_path / "out")])
    assert err.value.code == 1 and "error" not in capsys.readouterr().err
    monkeypatch.setenv("RANK", "0")
    code, _ = fails(["make-shards", "--src", tmp_path / "missing", "--out", tmp_path / "out"], capsys)
    one_line(code, ["make-shards", "missing"])


# --- make-shards -------------------------------------------------------------------------------------


def test_make_shards_never_overwrites_shards_it_did_not_write(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    foreign = out / "train-000000.tar"
    foreign.write_bytes(b"somebody else's shard")
    args = ["make-shards", "--synthetic", "video", "--out", out, "--num_samples", 2, "--num_frames", 2]
    args += ["--height", 16, "--width", 16, "--controls", "", "--progress", "false"]
    code, _ = fails(args, capsys)
    one_line(code, [str(foreign), "--overwrite"])
    assert foreign.read_bytes() == b"somebody else's shard" and sorted(out.iterdir()) == [foreign]
    main([str(a) for a in args + ["--overwrite", "true"]])  # asked for: replaced
    assert foreign.read_bytes() != b"somebody else's shard" and (out / "index.json").is_file()
    main([str(a) for a in args])  # its own shards: a rerun resumes as before
    assert "already complete" in capsys.readouterr().out


# --- infer -------------------------------------------------------------------------------------------


def infer_args(inputs, specs: list[dict], tmp_path: Path, *extra) -> list:
    spec_file = tmp_path / "specs.jsonl"
    spec_file.write_text("\n".join(json.dumps(s) for s in specs))
    return ["infer", "-i", spec_file, "-o", tmp_path / "out", "--model", inputs["model"], "--disable-guardrails"] + [
        *extra
    ]


def spec(inputs, name: str, **kw) -> dict:
    video = str(inputs["dir"] / "input.mp4")
    return {"name": name, "prompt": "a square", "video_path": video, "resolution": f"{SIZE}x{SIZE}", "max_frames": 2,
            "num_steps": 1, "guidance": 0, "edge": {}} | kw  # fmt: skip


def test_infer_refuses_a_control_the_model_has_no_branch_for(inputs, tmp_path, capsys):
    specs = [spec(inputs, "fine"), spec(inputs, "asks_vis", vis={})]  # the model has an edge branch only
    code, _ = fails(infer_args(inputs, specs, tmp_path), capsys)
    message = str(code)
    assert "'asks_vis'" in message and "field 'vis'" in message and "no blur control branch" in message, message
    assert len(message.splitlines()) == 1 and not (tmp_path / "out").exists()  # the valid first spec too


def test_infer_refuses_a_video_that_does_not_decode(inputs, tmp_path, capsys):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42 and then nothing")
    specs = [spec(inputs, "fine"), spec(inputs, "broken", video_path=str(broken))]
    code, _ = fails(infer_args(inputs, specs, tmp_path), capsys)
    message = str(code)
    assert "'broken'" in message and "field 'video_path'" in message and str(broken) in message, message
    assert "not a decodable video" in message and not (tmp_path / "out").exists()


def test_infer_on_cuda_without_a_gpu(inputs, tmp_path, capsys, no_cuda):
    code, _ = fails(infer_args(inputs, [spec(inputs, "fine")], tmp_path, "--device", "cuda"), capsys)
    one_line(code, ["infer", "--device cuda", "no CUDA device"])
    assert not (tmp_path / "out").exists()


def test_infer_refuses_a_model_whose_config_is_no_network_config(inputs, tmp_path, capsys):
    model = tmp_path / "diffusers_transformer"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"_class_name": "CosmosTransformer3DModel", "num_layers": 28}))
    shutil.copy(Path(inputs["model"]) / "model.safetensors", model)
    args = infer_args(dict(inputs, model=str(model)), [spec(inputs, "fine")], tmp_path, "--tokenizer", "pixel")
    code, _ = fails(args + ["--tokenizer_options", '{"spatial": 2}', "--text_encoder", "tiny"], capsys)
    one_line(code, ["config.json", "not a vidistill network config", "_class_name"])
    assert not (tmp_path / "out").exists()


def test_infer_refuses_weights_that_do_not_fit_their_config(inputs, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(inputs["model"], model)
    config = json.loads((model / "config.json").read_text())
    config["dit"]["dim"] *= 2
    (model / "config.json").write_text(json.dumps(config))
    code, _ = fails(infer_args(dict(inputs, model=str(model)), [spec(inputs, "fine")], tmp_path), capsys)
    one_line(code, ["model.safetensors does not fit its config.json", "of another shape"])
    assert not (tmp_path / "out").exists()


# --- quickstart --------------------------------------------------------------------------------------


def test_quickstart_on_cuda_without_a_gpu_writes_nothing(tmp_path, capsys, no_cuda):
    code, _ = fails(["quickstart", "--out", tmp_path / "qs", "--device", "cuda"], capsys)
    one_line(code, ["quickstart", "--device cuda", "no CUDA device"])
    assert not (tmp_path / "qs").exists()


# --- fit -----------------------------------------------------------------------------------------------


def fit_recipe(inputs, root: Path, data: str, **trainer) -> Path:
    logger = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": str(root)}}
    return recipe("control", root, data, steps=1, trainer={"logger": logger, **trainer})


@pytest.mark.parametrize("data", ["missing", "empty"])
def test_fit_without_data_says_so_and_writes_nothing(inputs, tmp_path, capsys, in_process, data):
    folder = tmp_path / data
    if data == "empty":
        folder.mkdir()
    cfg = fit_recipe(inputs, tmp_path / "run", str(folder))
    code, _ = fails(["fit", "--config", cfg], capsys)
    one_line(code, ["vidistill fit: error: data.train_shards", str(folder)])
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["recipe.yaml"]  # no TensorBoard version


def test_fit_on_only_broken_shards_says_so_and_writes_nothing(inputs, tmp_path, capsys, in_process):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "train-000000.tar").write_bytes(b"")
    (folder / "train-000001.tar").write_bytes(b"not a tar" * 100)
    cfg = fit_recipe(inputs, tmp_path / "run", str(folder))
    code, _ = fails(["fit", "--config", cfg], capsys)
    one_line(code, ["no usable sample", str(folder / "train-000000.tar"), "empty file"])
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["recipe.yaml"]


def test_fit_refuses_a_clip_size_the_network_cannot_patch_before_writing(inputs, tmp_path, capsys, in_process):
    cfg = fit_recipe(inputs, tmp_path / "run", inputs["shards"])
    code, _ = fails(["fit", "--config", cfg, "--data.init_args.height", 14], capsys)
    one_line(code, ["clips of 4x14x16", "multiples of 4x4"])
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["recipe.yaml"]


def test_fit_on_a_gpu_recipe_without_a_gpu(inputs, tmp_path, capsys, in_process, no_cuda):
    cfg = fit_recipe(inputs, tmp_path / "run", inputs["shards"])
    code, _ = fails(["fit", "--config", cfg, "--trainer.accelerator", "gpu"], capsys)
    one_line(code, ["--trainer.accelerator gpu", "no CUDA GPU", "--trainer.accelerator cpu"])
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["recipe.yaml"]


def test_fit_error_inside_training_is_one_line(inputs, tmp_path, capsys, in_process):
    """An error the run meets once training started (a network directory that is not there)."""
    cfg = fit_recipe(inputs, tmp_path / "run", inputs["shards"])
    code, err = fails(["fit", "--config", cfg, "--model.init_args.net.init_from", tmp_path / "nowhere"], capsys)
    one_line(code, ["vidistill fit: error:", "nowhere/config.json not found"])
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "key, value, hint",
    [
        ("--trainer.max_stpes", "3", "'trainer.max_steps'"),
        ("--model.init_args.optim.warmup_stpes", "3", "'optim.warmup_steps'"),
        ("--model.init_args.modalty", "edge", "'modality'"),
        ("--data.init_args.batch_sizee", "2", "'batch_size'"),
    ],
)
def test_a_misspelt_recipe_key_names_the_closest_valid_one(inputs, tmp_path, capsys, key, value, hint):
    cfg = fit_recipe(inputs, tmp_path / "run", inputs["shards"])
    with pytest.raises(SystemExit) as err:
        main(["fit", "--config", str(cfg), key, value])
    assert err.value.code == 2
    stderr = capsys.readouterr().err
    assert key.split(".")[-1] in stderr and f"did you mean {hint}?" in stderr, stderr
    errors = [line for line in stderr.splitlines() if not line.startswith("tip: ")]
    assert len(errors) == 1 and errors[0].startswith("error: "), stderr  # no usage, no dump of init_args
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["recipe.yaml"]


def test_a_misspelt_key_in_the_recipe_file(inputs, tmp_path, capsys):
    cfg = fit_recipe(inputs, tmp_path / "run", inputs["shards"])
    config = json.loads(cfg.read_text())
    config["trainer"]["max_step"] = config["trainer"].pop("max_steps")
    cfg.write_text(json.dumps(config))
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(cfg)])
    assert "'trainer.max_step' (did you mean 'trainer.max_steps'?)" in capsys.readouterr().err
