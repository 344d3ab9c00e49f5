"""What a user sees and keeps while a stage trains: progress in steps (a bar in a terminal, a
line every few steps in a log), sample videos (TensorBoard and files) with their control
metrics, throughput and memory, checkpoints that are never half-written, and pre-emption. (EMA
weights are the stage's own buffers: modules/stages/ema.py.)
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from weakref import proxy

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar

from modules.checkpoint import PARTIAL, checkpoint_path, latest_checkpoint, remove_checkpoint, save_atomic
from modules.nets import PEAK_TFLOPS, forward_flops


def gif_bytes(video: np.ndarray, fps: float) -> bytes:
    """(T, H, W, 3) uint8 -> animated GIF (what TensorBoard's image dashboard plays)."""
    from PIL import Image

    frames = [Image.fromarray(f) for f in video]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=int(1000 / fps), loop=0)
    return buf.getvalue()


def log_video(logger, tag: str, video: np.ndarray, step: int, fps: float) -> bool:
    """Write an animated GIF summary to a TensorBoard logger. SummaryWriter.add_video needs
    moviepy<2 and silently logs nothing without it, so the summary is built here."""
    writer = getattr(logger, "experiment", None)
    if writer is None or not hasattr(writer, "_get_file_writer"):
        return False
    from tensorboard.compat.proto.summary_pb2 import Summary

    T, H, W, C = video.shape
    image = Summary.Image(height=H, width=W, colorspace=C, encoded_image_string=gif_bytes(video, fps))
    writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)
    return True


class SampleVideos(L.Callback):
    """On the first validation batch: generate videos for its prompts and controls, log them to
    TensorBoard and as WebM files next to the logs, and log the control's metric (Edge F1 for
    edge, Blur SSIM for blur) of the samples as a validation metric."""

    def __init__(
        self,
        max_videos: int = 4,
        seed: int = 0,
        fps: float = 8.0,
        write_files: bool = True,
        compare_without_control: bool = True,
        edge_tolerance: int = 2,
    ):
        """
        Args:
            max_videos: videos logged per validation (rank 0's first ones).
            seed: noise seed of the samples (the same every validation, so runs compare).
            fps: playback rate of the logged videos.
            write_files: also write WebM (VP9) files under <log dir>/samples.
            compare_without_control: also sample the same prompts and seeds without the control
                branch and log its metric as val/<metric>_no_control (the base's score).
            edge_tolerance: pixel tolerance of Edge F1 (2 at 720p; 1 suits clips of ~64 px).
        """
        super().__init__()
        self.max_videos, self.seed, self.fps, self.write_files = max_videos, seed, fps, write_files
        self.compare, self.tolerance = compare_without_control, edge_tolerance

    def on_validation_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0):
        if (
            batch_idx != 0
            or trainer.sanity_checking
            or getattr(module, "tokenizer", None) is None
            or not hasattr(module, "generate")
        ):
            return
        videos = module.generate(batch, seed=self.seed)  # every rank: the network is sharded
        metric = control_metric(module.modality, videos, batch, self.tolerance)
        if metric is not None:
            module.log(f"val/{metric[0]}", metric[1], sync_dist=True)
            if self.compare:
                plain = module.generate(batch, seed=self.seed, use_control=False)
                name, value = control_metric(module.modality, plain, batch, self.tolerance)
                module.log(f"val/{name}_no_control", value, sync_dist=True)
        if trainer.global_rank != 0:
            return
        out_dir = Path(trainer.log_dir or trainer.default_root_dir) / "samples"
        step = log_step(trainer)
        for i, video in enumerate(videos[: self.max_videos]):
            frames = video.permute(1, 2, 3, 0).cpu().numpy()  # (T, H, W, 3)
            if "control" in batch:
                frames = np.concatenate([batch["control"][i].permute(1, 2, 3, 0).cpu().numpy(), frames], axis=2)
            log_video(trainer.logger, f"samples/{i}", frames, step, self.fps)
            if self.write_files:
                from datamodules.codec import encode_video

                out_dir.mkdir(parents=True, exist_ok=True)
                data = encode_video(_even(frames), self.fps, codec="vp9")
                (out_dir / f"step{trainer.global_step:07d}_{i}.webm").write_bytes(data)


def log_step(trainer) -> int:
    """The step Lightning logs `self.log` values at (its logger connector's, as its own
    LearningRateMonitor uses): during fit the batches stepped so far, which validation inside an
    epoch reads before the batch that triggered it is counted, i.e. one less than global_step.
    Summaries written beside Lightning's (sample videos) use it, so they land on the step of the
    validation scalars they belong to."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def _even(frames: np.ndarray) -> np.ndarray:
    """Crop to even sizes (4:2:0 video needs them)."""
    T, H, W, _ = frames.shape
    return frames[:, : H - H % 2, : W - W % 2]


def control_metric(
    modality: str | None, videos: torch.Tensor, batch: dict, edge_tolerance: int = 2
) -> tuple[str, float] | None:
    """Edge F1 of samples against the input edge maps, or Blur SSIM against the input video."""
    from datamodules.metrics import blur_ssim, edge_f1

    if modality == "edge" and "control" in batch:
        pairs = [(v, c) for v, c in zip(videos, batch["control"])]
        return "edge_f1", float(np.mean([edge_f1(_thwc(v), _thwc(c), edge_tolerance) for v, c in pairs]))
    if modality == "blur" and "video" in batch:
        return "blur_ssim", float(np.mean([blur_ssim(_thwc(v), _thwc(x)) for v, x in zip(videos, batch["video"])]))
    return None


def _thwc(video: torch.Tensor) -> np.ndarray:
    return video.permute(1, 2, 3, 0).cpu().numpy()


class Throughput(L.Callback):
    """Samples/s, tokens/s, step time, an MFU estimate (3x forward matmul FLOPs of the networks
    in the forward) and peak GPU memory, logged (and printed by rank 0) every `every` optimizer
    steps. The first step (allocation, autotuning) is left out of the first window."""

    def __init__(self, every: int = 10, peak_tflops: float = PEAK_TFLOPS, print_stats: bool = True):
        super().__init__()
        self.every, self.peak, self.print_stats = every, peak_tflops * 1e12, print_stats
        self._t0: float | None = None
        self._samples = self._steps = 0
        self._last_step = 0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if self._t0 is None:  # the first step ends here: start timing from now
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self._t0, self._last_step = time.perf_counter(), trainer.global_step
            return
        # data-parallel ranks only: a context-parallel group shares its batch (trainers/strategy.py)
        dp_world = module.data_rank()[1] if hasattr(module, "data_rank") else trainer.world_size
        self._samples += _batch_size(batch) * dp_world
        if trainer.global_step % self.every or trainer.global_step == self._last_step:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        dt = time.perf_counter() - self._t0
        rate = self._samples / dt
        steps = trainer.global_step - self._last_step
        stats = {"perf/samples_per_s": rate, "perf/step_s": dt / max(steps, 1)}
        tokens = getattr(module, "tokens_per_sample", lambda b: None)(batch)
        if tokens:
            stats["perf/tokens_per_s"] = rate * tokens
            cfg = module.trained_model().cfg
            flops = forward_flops(cfg.dit.dim, tokens, cfg.dit.depth + cfg.control.blocks * len(cfg.modalities))
            if torch.cuda.is_available():
                stats["perf/mfu"] = 3 * flops * rate / trainer.world_size / self.peak
        if torch.cuda.is_available():
            stats["perf/peak_mem_GiB"] = torch.cuda.max_memory_allocated() / 2**30
        module.log_dict(stats, rank_zero_only=True)
        if self.print_stats and trainer.global_rank == 0:
            print(
                f"step {trainer.global_step}: " + ", ".join(f"{k.split('/')[1]} {v:.4g}" for k, v in stats.items()),
                flush=True,
            )
        self._t0, self._samples, self._last_step = time.perf_counter(), 0, trainer.global_step


class StepProgress(TQDMProgressBar):
    """Training progress in optimizer steps against max_steps. In a terminal: one bar over the
    whole run (Lightning's default counts the batches of each data epoch and reads `Epoch 0/-2`
    when a run is counted in steps). When stdout is no terminal (nohup, SLURM, CI logs), where a
    bar writes nothing readable: a line every `every` optimizer steps (default: the trainer's
    log_every_n_steps) and at the last one, printed by rank 0:

        step 50/400 (12%) | train/loss 0.1234 | 0.52 s/step | ETA 3m02s

    The values are the progress bar's (what the stage logs with prog_bar=True); s/step is the
    average since the previous line (validation included), the ETA that rate times the steps left.
    `vidistill fit` puts this in place of Lightning's default progress bar."""

    def __init__(self, every: int | None = None, refresh_rate: int = 1, terminal: bool | None = None):
        """
        Args:
            every: optimizer steps between two lines when the output is no terminal; None: the
                trainer's log_every_n_steps.
            refresh_rate: steps between two redraws of the bar in a terminal.
            terminal: draw the bar (True) or print lines (False); None: whether stdout is a terminal.
        """
        super().__init__(refresh_rate=refresh_rate)
        self.every, self.terminal = every, terminal
        self._mark: tuple[int, float] = (0, 0.0)  # (step, time) of the previous line

    @property
    def is_enabled(self) -> bool:
        return bool(self.terminal) and super().is_enabled  # no bars where they would not render

    @property
    def train_description(self) -> str:
        return "train (steps)"

    def setup(self, trainer, pl_module, stage) -> None:
        if self.terminal is None:
            self.terminal = sys.stdout.isatty()  # where Lightning's bars (and these lines) go
        super().setup(trainer, pl_module, stage)

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._mark = (trainer.global_step, time.perf_counter())
        bar = self.train_progress_bar
        bar.reset(total=self._total(trainer))
        bar.initial = bar.n = trainer.global_step  # a resumed run starts where it was
        bar.refresh()

    def on_train_epoch_start(self, trainer, *_) -> None:
        pass  # one bar for the whole run, not one per data epoch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step, total = trainer.global_step, self._total(trainer)
        if self.is_enabled and (step % self.refresh_rate == 0 or step == total):
            self.train_progress_bar.n = step
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))  # redraws
        every = self.every or trainer.log_every_n_steps or 50
        if self.terminal or not trainer.is_global_zero or step == self._mark[0]:
            return
        if step % every == 0 or step == total:
            print(self.line(trainer, pl_module, step, total), flush=True)

    def line(self, trainer, pl_module, step: int, total: int | None) -> str:
        """The progress line of `step` (and the start of the next rate's window)."""
        now = time.perf_counter()
        rate = (now - self._mark[1]) / max(step - self._mark[0], 1)
        self._mark = (step, now)
        metrics = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num"}
        parts = [f"step {step}/{total} ({100 * step // total}%)" if total else f"step {step}"]
        parts += [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()]
        parts.append(f"{rate:.3g} s/step")
        if total:
            parts.append(f"ETA {_duration(rate * (total - step))}")
        return " | ".join(parts)

    @staticmethod
    def _total(trainer) -> int | None:
        """The run's optimizer steps: max_steps, else Lightning's estimate (None when unbounded)."""
        if trainer.max_steps and trainer.max_steps > 0:
            return trainer.max_steps
        total = trainer.estimated_stepping_batches
        return int(total) if total != float("inf") else None


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _batch_size(batch: dict) -> int:
    for key in ("latent", "video"):
        if key in batch:
            return len(batch[key])
    return 1


# --------------------------------------------------------------------------------------------
# Checkpoints that are never taken half-written, and pre-emption
# --------------------------------------------------------------------------------------------


class AtomicCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint (same arguments) whose saves are atomic (`save_atomic`) and
    whose "last" (`fit(ckpt_path="last")`, `--ckpt_path last`) is the complete checkpoint of the
    highest global step in `dirpath`, whatever its name: periodic, last, pre-emption or
    non-finite stop. Lightning's own picks the newest `last*.ckpt` by modification time and
    overwrites a sharded `last.ckpt` directory in place, so a kill during that save left a mix of
    new and old shards that resumed as "last". `vidistill fit` turns a recipe's ModelCheckpoint
    into this class.

    Two more differences: a periodic checkpoint the run resumed from is removed like any other
    once a newer one is saved (Lightning keeps the checkpoint it resumed from forever, so with
    save_top_k 1 every resume left one more behind); and with save_last, the end of training
    saves "last" at the final step when the last periodic save was earlier (Lightning saves it at
    the end only when nothing was saved), so "last" is always the trained state."""

    def setup(self, trainer, pl_module, stage) -> None:
        super().setup(trainer, pl_module, stage)
        if trainer.is_global_zero and self.dirpath and Path(self.dirpath).is_dir():
            for p in Path(self.dirpath).glob("*" + PARTIAL):  # saves that were killed
                remove_checkpoint(p)

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        # ModelCheckpoint._save_checkpoint with the save made atomic
        save_atomic(trainer, filepath, self.save_weights_only)
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))

    def _should_remove_checkpoint(self, trainer, previous: str, current: str) -> bool:
        # Lightning's rule without its exception for the checkpoint the run resumed from: a
        # replaced checkpoint of this directory goes, one elsewhere (e.g. --ckpt_path from
        # another run) stays. Safe here: the newer one is complete before this is asked.
        if previous == current:
            return False
        if not _is_local_file_protocol(previous):
            return True
        return Path(self.dirpath).absolute() in Path(previous).absolute().parents

    def on_train_end(self, trainer, pl_module) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        else:
            super().on_train_end(trainer, pl_module)

    def _remove_checkpoint(self, trainer, filepath: str) -> None:
        if trainer.is_global_zero:
            remove_checkpoint(Path(filepath))

    def _find_last_checkpoints(self, trainer) -> set[str]:
        dirpath = self.dirpath or self._ModelCheckpoint__resolve_ckpt_dir(trainer)
        latest = latest_checkpoint(dirpath)
        return {str(latest)} if latest is not None else set()


class Preempted(SystemExit):
    """Raised on every rank after the pre-emption checkpoint: the process exits with status 0."""


class Preemption(L.Callback):
    """SLURM pre-emption: on `signal_name` (SLURM sends it `--signal=SIGUSR1@120` before the time
    limit or a pre-emption), at the next batch end every rank saves an atomic checkpoint
    (`preempted-step=N.ckpt` in the checkpoint directory, which `--ckpt_path last` resumes), rank
    0 requeues the job with `scontrol requeue $SLURM_JOB_ID` (inside SLURM only), and the run
    exits (status 0) without validation or export.

    Why not Lightning's SLURM handler: it saves `hpc_ckpt_N.ckpt` from inside the signal handler,
    i.e. at any point of a step (mid-backward, or between a rank's collectives, which hangs or
    corrupts sharded saves), non-atomically, keeps training after the requeue until SLURM kills
    the job, and `--ckpt_path last` never looks at hpc checkpoints. Installed in `setup`, this
    handler comes first, so Lightning installs no SIGUSR1 handler of its own. The handler only
    sets a flag; the ranks agree on it with a one-element all-reduce at every batch end, so all
    of them stop at the same step even when the signal reaches them at different times.
    """

    def __init__(self, signal_name: str = "SIGUSR1", requeue: bool = True):
        """
        Args:
            signal_name: the signal that announces the end of the allocation (SLURM's --signal).
            requeue: run `scontrol requeue` (rank 0, when SLURM_JOB_ID is set) after the save.
        """
        super().__init__()
        self.signum, self.requeue = signal.Signals[signal_name], requeue
        self.received = False
        self._previous = None

    def _handler(self, signum, frame) -> None:
        self.received = True  # only a flag: the real work happens at a batch boundary

    def setup(self, trainer, pl_module, stage) -> None:
        if stage == "fit" and self._previous is None:
            self.received = False
            self._previous = signal.signal(self.signum, self._handler)

    def teardown(self, trainer, pl_module, stage) -> None:
        if self._previous is not None:
            signal.signal(self.signum, self._previous)
            self._previous = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        flag = torch.tensor(float(self.received), device=pl_module.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if not flag.item():
            return
        # this step's metrics to the loggers first: Lightning sends them after the batch-end hooks
        # return, which this one never does (the last TensorBoard point before the signal was lost)
        trainer._logger_connector.on_batch_end()
        trainer._logger_connector.update_train_step_metrics()
        for logger in trainer.loggers:
            logger.finalize("finished")
        path = save_atomic(trainer, checkpoint_path(trainer, f"preempted-step={trainer.global_step}"))
        requeued = trainer.is_global_zero and self.requeue and requeue_slurm_job()
        if trainer.is_global_zero:
            print(
                f"pre-empted at step {trainer.global_step}: checkpoint {path}" + ("; job requeued" if requeued else ""),
                flush=True,
            )
        raise Preempted(0)


def requeue_slurm_job() -> bool:
    """`scontrol requeue` this SLURM job (an array task as JOBID_TASKID); False outside SLURM or
    when the command fails (it is then reported)."""
    array_job, job = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_JOB_ID")
    job_id = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else job
    if not job_id:
        return False
    result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
    if result.returncode:
        print(f"scontrol requeue {job_id} failed ({result.returncode}): {result.stderr.strip()}", flush=True)
    return result.returncode == 0
