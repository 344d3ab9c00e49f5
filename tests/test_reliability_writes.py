"""Writers on a full disk, over outputs that exist, and readers of truncated files: no file is
left half-written under its final name, "No space left on device" is said as such with the file,
and a truncated checkpoint is named as truncated, each in one line (in-process `tools.cli.main`)."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers.reliability import recipe, teacher, video_shards
from tests.test_errors import fails, in_process, one_line  # noqa: F401 - in_process is a fixture
from tools.cli import main


def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A small sharded checkpoint as a stage saves it: a DCP directory with meta.pt."""
    import torch.distributed.checkpoint as dcp

    from modules.denoiser import Denoiser

    d = tmp_path_factory.mktemp("ckpt") / "last.ckpt"
    net = Denoiser.from_pretrained(teacher(d.parent / "teacher"))
    state = {f"state_dict.model.{k}": v for k, v in net.state_dict().items()}
    dcp.save(state, checkpoint_id=str(d), no_dist=True)
    torch.save({"global_step": 3, "net_configs": {"model": net.cfg.to_dict()}}, d / "meta.pt")
    return d


def test_make_shards_on_a_full_disk_leaves_no_tmp(tmp_path, capsys, monkeypatch):
    from datamodules import writer

    monkeypatch.setattr(writer, "_add", full_disk)
    out = tmp_path / "out"
    args = ["make-shards", "--synthetic", "video", "--out", out, "--num_samples", 2, "--num_frames", 2]
    code, _ = fails(args + ["--height", 16, "--width", 16, "--controls", "", "--progress", "false"], capsys)
    one_line(code, ["No space left on device", str(out / "train-000000.tar")])
    assert [p.name for p in out.iterdir()] == ["index.json"]  # the resumable run's record, no .tar.tmp


def test_make_specs_on_an_empty_tar_writes_nothing(tmp_path, capsys):
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "val-000000.tar").write_bytes(b"")
    code, _ = fails(["make-specs", tmp_path / "shards", "--out", tmp_path / "specs"], capsys)
    one_line(code, [str(tmp_path / "shards" / "val-000000.tar"), "0 bytes"])
    assert not (tmp_path / "specs").exists()


def test_make_specs_on_a_full_disk_leaves_no_clip(tmp_path, capsys, monkeypatch):
    shards = video_shards(tmp_path / "shards", samples=2)
    monkeypatch.setattr(Path, "write_text", full_disk)  # the spec file, after the clips
    code, _ = fails(["make-specs", shards, "--out", tmp_path / "specs"], capsys)
    one_line(code, ["No space left on device", str(tmp_path / "specs" / "specs.jsonl")])
    assert sorted(p.name for p in (tmp_path / "specs").rglob("*")) == sorted(
        ["videos"] + [p.name for p in (tmp_path / "specs" / "videos").iterdir()]
    )
    assert not list((tmp_path / "specs").rglob(".*partial*"))


def test_consolidate_refuses_an_out_in_use_and_writes_whole(ckpt, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("mine")
    code, _ = fails(["consolidate", ckpt, "--out", out], capsys)
    one_line(code, [str(out), "--overwrite true"])
    assert [p.name for p in out.iterdir()] == ["config.json"] and (out / "config.json").read_text() == "mine"
    (tmp_path / "file").write_text("mine")
    one_line(fails(["consolidate", ckpt, "--out", tmp_path / "file"], capsys)[0], ["is a file"])
    main(["consolidate", str(ckpt), "--out", str(out), "--overwrite"])
    assert sorted(p.name for p in out.iterdir()) == ["model"]
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    code, _ = fails(["consolidate", ckpt, "--out", tmp_path / "new"], capsys)
    one_line(code, ["No space left on device", str(tmp_path / "new")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "out"]


@pytest.mark.parametrize("name", ["__0_0.distcp", ".metadata", "meta.pt"])
def test_a_truncated_checkpoint_is_named(ckpt, tmp_path, capsys, name, in_process):  # noqa: F811
    broken = tmp_path / "broken.ckpt"
    shutil.copytree(ckpt, broken)
    with open(broken / name, "r+b") as f:
        f.truncate(100)
    code, _ = fails(["consolidate", broken, "--out", tmp_path / "out"], capsys)
    one_line(code, [str(broken / name), "truncated"])
    data = video_shards(tmp_path / "data")
    config = recipe(
        "control", tmp_path / "run", data, teacher(tmp_path / "teacher"), steps=2, every=1, trainer={"logger": None}
    )
    code, _ = fails(["fit", "--config", config, "--ckpt_path", broken], capsys)
    one_line(code, [str(broken / name), "truncated"])
    assert not (tmp_path / "out").exists() and not list((tmp_path / "run").rglob("version_*"))


def test_a_checkpoint_save_on_a_full_disk_says_so(tmp_path, capsys, monkeypatch, in_process):  # noqa: F811
    from torch.distributed.checkpoint import filesystem

    monkeypatch.setattr(filesystem, "_write_item", full_disk)
    data = video_shards(tmp_path / "data")
    config = recipe("control", tmp_path / "run", data, teacher(tmp_path / "teacher"), steps=2, every=1)
    code, _ = fails(["fit", "--config", config], capsys)
    one_line(code, ["No space left on device", str(tmp_path / "run" / "ckpt" / "epoch=0-step=1.ckpt")])
    assert not list((tmp_path / "run" / "ckpt").glob("*.partial"))
