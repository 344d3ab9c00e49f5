"""What a user sees and keeps while a stage trains: EMA weights, sample videos (TensorBoard and
files) with their control metrics, throughput and memory.

EMA is not a Lightning Callback: its shadow weights are sharded like the parameters and must
travel in the sharded (DCP) checkpoint, which only carries the module's state dict, so they are
buffers of the stage, created in configure_model and updated from its training hook.
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

from modules.nets import forward_flops


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class EMAWeights(nn.Module):
    """Exponential moving average of trainable parameters, kept as (sharded) buffers:
    ema <- decay * ema + (1 - decay) * param, on each rank's local shards (no communication)."""

    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        for name in self.names:
            self.register_buffer(name.replace(".", "__"), params[name].detach().clone())

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        shadows = [_local(getattr(self, n.replace(".", "__"))) for n in self.names]
        current = [_local(params[n].detach()) for n in self.names]
        torch._foreach_lerp_(shadows, current, 1.0 - self.decay)

    def state_for(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The model's state dict with EMA values in place of the trained parameters."""
        state = dict(model.state_dict())
        for name in self.names:
            state[name] = getattr(self, name.replace(".", "__"))
        return state


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

    def __init__(self, max_videos: int = 4, seed: int = 0, fps: float = 8.0, write_files: bool = True,
                 compare_without_control: bool = True, edge_tolerance: int = 2):
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
        if batch_idx != 0 or trainer.sanity_checking or getattr(module, "tokenizer", None) is None \
                or not hasattr(module, "generate"):
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
        for i, video in enumerate(videos[: self.max_videos]):
            frames = video.permute(1, 2, 3, 0).cpu().numpy()  # (T, H, W, 3)
            if "control" in batch:
                frames = np.concatenate([batch["control"][i].permute(1, 2, 3, 0).cpu().numpy(), frames], axis=2)
            log_video(trainer.logger, f"samples/{i}", frames, trainer.global_step, self.fps)
            if self.write_files:
                from datamodules.codec import encode_video

                out_dir.mkdir(parents=True, exist_ok=True)
                data = encode_video(_even(frames), self.fps, codec="vp9")
                (out_dir / f"step{trainer.global_step:07d}_{i}.webm").write_bytes(data)


def _even(frames: np.ndarray) -> np.ndarray:
    """Crop to even sizes (4:2:0 video needs them)."""
    T, H, W, _ = frames.shape
    return frames[:, : H - H % 2, : W - W % 2]


def control_metric(modality: str | None, videos: torch.Tensor, batch: dict,
                   edge_tolerance: int = 2) -> tuple[str, float] | None:
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

    def __init__(self, every: int = 10, peak_tflops: float = 790.0, print_stats: bool = True):
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
        self._samples += _batch_size(batch) * trainer.world_size
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
            print(f"step {trainer.global_step}: " + ", ".join(f"{k.split('/')[1]} {v:.4g}" for k, v in stats.items()),
                  flush=True)
        self._t0, self._samples, self._last_step = time.perf_counter(), 0, trainer.global_step


def _batch_size(batch: dict) -> int:
    for key in ("latent", "video"):
        if key in batch:
            return len(batch[key])
    return 1
