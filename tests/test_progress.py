"""What `vidistill fit` shows and keeps, from two in-process runs of a tiny control stage (the
second resumes the first from its periodic checkpoint): progress lines when the output is no
terminal, a plain word when `--ckpt_path last` finds nothing, "last" saved at the end, the
periodic checkpoint a run resumed from removed once a newer one exists, TensorBoard without a
placeholder hp_metric and with sample videos on the step of their validation scalars. And the
progress bar in a terminal, which counts steps against max_steps."""

from __future__ import annotations

import io
import os
import re
import warnings
from contextlib import redirect_stdout
from types import SimpleNamespace

import pytest
import torch

from modules.checkpoint import checkpoint_step, latest_checkpoint
from tests.helpers.reliability import recipe, video_shards
from tools.cli import main

# the ETA in any of its forms (12s, 1m05s, 1h02m): on a loaded machine a step takes long enough
# for minutes, and a line not matched here would count as a missing one
LINE = re.compile(
    r"^step (\d+)/(\d+) \(\d+%\) \| train/loss [0-9.e+-]+ \|.* [0-9.e+-]+ s/step \| ETA (?:\d+h\d\dm|(?:\d+m)?\d+s)$",
    re.M,
)


def fit(*argv) -> tuple[str, list[str]]:
    """`vidistill fit ARGV` in-process with stdout no terminal; (stdout, warning messages)."""
    out, env = io.StringIO(), dict(os.environ)
    try:
        with redirect_stdout(out), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            main(["fit", *map(str, argv)])
    finally:  # the in-process run leaves a process group and launcher variables behind
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(env)
    return out.getvalue(), [str(w.message) for w in caught]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("progress")
    data, root = video_shards(d / "data"), d / "run"
    ckpt = root / "ckpt"
    trainer = {
        "enable_progress_bar": True,
        "log_every_n_steps": 1,
        "limit_val_batches": 1,
        "val_check_interval": 3,
        "check_val_every_n_epoch": None,
        "logger": None,  # Lightning's default: TensorBoard under default_root_dir
        "callbacks": [
            {
                "class_path": "trainers.callbacks.AtomicCheckpoint",
                "init_args": {"dirpath": str(ckpt), "every_n_train_steps": 2, "save_last": True},
            },
            {"class_path": "trainers.callbacks.SampleVideos", "init_args": {"max_videos": 1, "write_files": False}},
        ],
    }
    cfg = recipe("control", root, data, steps=3, trainer=trainer, datamodule={"val_shards": data, "val_samples": 2})
    first = fit("--config", cfg, "--ckpt_path", "last")
    after_first = {p.name: checkpoint_step(p) for p in ckpt.iterdir()}
    # a kill while "last" was saved: the latest complete checkpoint is the periodic one of step 2
    (ckpt / "last.ckpt").rename(ckpt / "last.ckpt.partial")
    assert checkpoint_step(latest_checkpoint(ckpt)) == 2
    second = fit("--config", cfg, "--ckpt_path", "last", "--trainer.max_steps", 6)
    after_second = {p.name: checkpoint_step(p) for p in ckpt.iterdir()}
    return SimpleNamespace(root=root, first=first, second=second, after_first=after_first, after_second=after_second)


def test_progress_lines_when_the_output_is_no_terminal(runs):
    first = [(int(a), int(b)) for a, b in LINE.findall(runs.first[0])]
    assert first == [(1, 3), (2, 3), (3, 3)], runs.first[0]
    second = [(int(a), int(b)) for a, b in LINE.findall(runs.second[0])]
    assert second == [(3, 6), (4, 6), (5, 6), (6, 6)], runs.second[0]  # resumed after step 2
    assert "\r" not in runs.first[0]  # no bar redraws in a log file


def test_a_slow_step_still_gives_a_progress_line():
    """On a loaded machine (2 cores at load 6) a step of these runs can take 20 s and more: an ETA
    in minutes or hours is a progress line too, not one missing from the count above."""
    from trainers.callbacks import _duration

    for seconds in (7, 94, 3725):
        line = f"step 3/6 (50%) | train/loss 0.5 | lr 0.001 | 31.3 s/step | ETA {_duration(seconds)}"
        assert LINE.findall(line) == [("3", "6")], line


def test_ckpt_path_last_without_a_checkpoint_starts_fresh_and_says_so(runs):
    out, caught = runs.first
    assert "--ckpt_path last: no checkpoint found in" in out and "training starts fresh from step 0" in out
    assert not [w for w in caught if "save_last" in w]  # not Lightning's hint (the recipe sets it)


def test_last_is_saved_at_the_end_of_training(runs):
    assert runs.after_first == {"epoch=0-step=2.ckpt": 2, "last.ckpt": 3}


def test_a_resumed_run_removes_the_periodic_checkpoint_it_resumed_from(runs):
    # save_top_k 1: the step-2 checkpoint the run resumed from goes once step 4's exists, as 4's
    # goes for 6's (the killed save's leftover was cleaned at the start)
    assert runs.after_second == {"epoch=1-step=6.ckpt": 6, "last.ckpt": 6}


def test_tensorboard_has_no_placeholder_hp_metric_and_samples_on_their_validation_step(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(runs.root / "lightning_logs" / "version_0"), size_guidance={"images": 0})
    acc.Reload()
    assert "hp_metric" not in acc.Tags()["scalars"]
    val = {e.step for e in acc.Scalars("val/edge_f1")}
    assert val and {e.step for e in acc.Images("samples/0")} == val


def test_a_recipe_s_tensorboard_logger_goes_without_hp_metric():
    from jsonargparse import Namespace

    from trainers.cli import no_hp_metric

    logger = Namespace(class_path="lightning.pytorch.loggers.TensorBoardLogger", init_args=Namespace(name="tb"))
    no_hp_metric([logger])
    assert logger.init_args.default_hp_metric is False


def test_the_bar_in_a_terminal_counts_steps_against_max_steps(capsys):
    from trainers.callbacks import StepProgress

    trainer = SimpleNamespace(
        is_global_zero=True, max_steps=6, global_step=2, loggers=[], log_every_n_steps=1, current_epoch=3
    )
    trainer.progress_bar_metrics = {"train/loss": 0.5}
    bar = StepProgress(terminal=True)
    bar.setup(trainer, None, "fit")
    bar.on_train_start(trainer, None)
    bar.on_train_epoch_start(trainer)
    for step in range(3, 7):
        trainer.global_step = step
        bar.on_train_batch_end(trainer, None, None, None, step)
    bar.on_train_end(trainer, None)
    out = capsys.readouterr().out
    assert "6/6" in out and "train (steps)" in out and "train/loss=0.5" in out, out
    assert "Epoch" not in out and "step 6/6" not in out  # a bar, not the lines


def test_dmd2_logs_student_losses_at_student_turns_only(tmp_path):
    """Turns 0 and 3 are the student's (student_update_freq 3), 1, 2 and 4 the critics'."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.helpers.reliability import teacher

    data, model = video_shards(tmp_path / "data"), teacher(tmp_path / "teacher")
    cfg = recipe("dmd2", tmp_path / "run", data, model, steps=5, every=100, trainer={"logger": None})
    fit("--config", cfg, "--trainer.log_every_n_steps", 1)
    acc = EventAccumulator(str(tmp_path / "run" / "lightning_logs" / "version_0"))
    acc.Reload()
    steps = {tag: [e.step for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"] if tag.startswith("train/")}
    assert steps["train/student_dmd"] == steps["train/student_gan"] == [0, 3], steps
    assert steps["train/critic_fake_score"] == steps["train/critic_disc"] == [1, 2, 4], steps
    assert "hp_metric" not in acc.Tags()["scalars"]


def test_the_quickstart_checkpoints_every_50_steps_and_twice_per_stage(tmp_path, monkeypatch):
    import yaml

    from tools.quickstart import stages

    monkeypatch.chdir(tmp_path)
    called = []
    monkeypatch.setattr(stages, "fit_in_child", lambda *args: called.append([str(a) for a in args]))
    for steps, every in ((190, 50), (100, 50), (50, 25), (30, 15), (20, 10), (3, 1), (1, 1)):
        config = yaml.safe_load(stages.training_config("base", steps, "cpu").read_text())
        checkpoint = next(c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("AtomicCheckpoint"))
        assert checkpoint["init_args"]["every_n_train_steps"] == every and checkpoint["init_args"]["save_last"]
    stages.fit("base", 190, "cpu")  # a first run
    (stages.RUNS / "base" / "checkpoints").mkdir(parents=True)
    stages.fit("base", 190, "cpu")  # a rerun after a kill
    assert "--ckpt_path" not in called[0] and called[1][-2:] == ["--ckpt_path", "last"]


def test_a_failed_training_stage_stops_the_quickstart_in_one_line(tmp_path, monkeypatch, capfd):
    from tools.quickstart import stages

    monkeypatch.chdir(tmp_path)
    with pytest.raises(stages.StageFailed, match=r"`vidistill fit --config missing.yaml` exited with status 2"):
        stages.fit_in_child("--config", "missing.yaml")
    err = capfd.readouterr().err  # the child's own error, passed through
    assert "error:" in err and "missing.yaml" in err


def test_a_preempted_run_logs_the_step_it_stopped_after(tmp_path, monkeypatch):
    """SIGUSR1 before step 4: step 4 finishes, its TensorBoard point is written, then the run stops."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = video_shards(tmp_path / "data")
    cfg = recipe("control", tmp_path / "run", data, steps=6, every=100, trainer={"logger": None})
    monkeypatch.setenv("VIDISTILL_SIGUSR1_AT_STEP", "3")
    with pytest.raises(SystemExit) as stop:
        fit("--config", cfg, "--trainer.log_every_n_steps", 1)
    assert stop.value.code == 0 and (tmp_path / "run" / "ckpt" / "preempted-step=4.ckpt").is_dir()
    acc = EventAccumulator(str(tmp_path / "run" / "lightning_logs" / "version_0"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [0, 1, 2, 3]
