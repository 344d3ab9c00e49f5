"""One sample and one batch: raw webdataset members -> tensors (decoded clip, control, mask,
caption, text embeddings, latents), and the collation of samples into a batch.

Every way a sample can be broken raises one of `SAMPLE_ERRORS`, which the datasets in
datamodules/video.py catch to skip and count the sample. `SampleLoader.check` finds the same
without decoding frames (the probe of the training shards at setup). A video smaller than the
clip size asked for (width or height) is broken: it would be upscaled.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from datamodules.codec import VideoDecodeError, clip_indices, decode_video, probe, resize_crop
from datamodules.controls import (
    CONTROL_INTERPOLATION,
    compute_control,
    load_control_video,
    mask_video,
    render_keypoints,
)
from datamodules.formats import TEXT_MEMBER, load_text

__all__ = ["CHECK_VERSION", "SAMPLE_ERRORS", "SampleLoader", "check_fits", "collate"]

# What a broken sample raises (json and unicode errors are ValueErrors).
SAMPLE_ERRORS = (VideoDecodeError, KeyError, ValueError, cv2.error, SafetensorError)
# Bump when `SampleLoader.check` finds other samples broken: cached probes of shards are redone.
CHECK_VERSION = 1
_COMPUTABLE = ("edge", "blur")


# --------------------------------------------------------------------------------------------
# One sample
# --------------------------------------------------------------------------------------------


class SampleLoader:
    """Raw sample dict -> decoded sample dict (picklable; shared by train and val datasets)."""

    def __init__(
        self,
        num_frames,
        height,
        width,
        stride,
        target_fps,
        modality,
        control_preset,
        use_text_embeddings,
        use_latents,
        use_kd=False,
    ):
        self.num_frames, self.height, self.width = num_frames, height, width
        self.use_kd = use_kd
        self.stride, self.target_fps = stride, target_fps
        self.modality, self.control_preset = modality, control_preset
        self.use_text_embeddings, self.use_latents = use_text_embeddings, use_latents

    def requirements(self) -> str:
        """What `check` depends on, as a stable string (keys the probe cache of the shards)."""
        return json.dumps(
            {
                "version": CHECK_VERSION,
                "frames": self.num_frames,
                "size": [self.height, self.width],
                "stride": self.stride,
                "target_fps": self.target_fps,
                "modality": self.modality,
                "text": self.use_text_embeddings,
                "latents": self.use_latents,
                "kd": self.use_kd,
            },
            sort_keys=True,
        )

    def check(self, raw: dict) -> None:
        """Raise one of `SAMPLE_ERRORS` where training would find `raw` broken, as far as its
        members and its videos' container headers tell (frame count, fps and size; no frame is
        decoded unless a container does not know its frame count). It reads what `__call__`
        reads and nothing else (with `use_latents` the mp4 is only opened where a control or the
        fps needs it). Stricter than one call in one way: a per-frame member (keypoint.json,
        mask.mp4) must cover every frame a random clip start can reach."""
        self._load(raw, None, decode=False)

    def __call__(self, raw: dict, rng: random.Random | None) -> dict:
        """rng given: training (random clip start and control parameters); None: validation."""
        return self._load(raw, rng, decode=True)

    def _load(self, raw: dict, rng: random.Random | None, decode: bool) -> dict:
        meta = _json(raw)
        out: dict[str, Any] = {"key": raw["__key__"], "caption": _caption(raw, meta)}
        if self.use_text_embeddings:
            emb, mask = load_text(raw[TEXT_MEMBER])
            if emb.ndim != 2:
                raise ValueError(
                    f"{TEXT_MEMBER}: emb {tuple(emb.shape)} / mask {tuple(mask.shape)}, want (L, D) / (L,)"
                )
            out["text_emb"], out["text_mask"] = emb, mask
        if self.use_kd and self._kd(raw, out):
            out["fps"] = _check_fps(self._clip_fps(_fps_from(meta, raw)))
            return out
        need_pixels = not self.use_latents
        if self.use_latents:
            t = _tensors(raw["latent.safetensors"], "latent.safetensors")
            out["latent"] = _check_ndim(t["latent"], 4, "latent")
            name = f"control.{self.modality}"
            if self.modality is not None and name in t:
                out["control_latent"] = _check_ndim(t[name], 4, name)
            elif self.modality is not None:
                need_pixels = True  # control pixels from the video's first clip (the latents' clip)
        if not need_pixels:
            src_fps = _fps_from(meta, raw)
            out["fps"] = _check_fps(self._clip_fps(src_fps))
            if "mask.mp4" in raw:  # the latents' clip: the first one
                indices = clip_indices(
                    1 << 30, self.num_frames, self.stride, src_fps if self.target_fps else None, self.target_fps, 0
                )
                if decode:
                    out["mask"] = self._mask(raw["mask.mp4"], indices)
                else:
                    _check_length(raw["mask.mp4"], max(indices) + 1, "mask.mp4")
            return out

        data = raw["mp4"]
        info = probe(data)
        if info.width < self.width or info.height < self.height:
            raise ValueError(
                f"video is {info.width}x{info.height}, smaller than the {self.width}x{self.height} asked for"
            )
        src_fps = info.fps if info.fps > 0 else float(meta.get("fps", 0.0))
        everything = None
        total = info.frames
        if total <= 0:  # the container does not know: decode it all once
            everything, _ = decode_video(data)
            total = len(everything)
        start = 0 if rng is None or self.use_latents or self.use_kd else None
        indices = clip_indices(
            total, self.num_frames, self.stride, src_fps if self.target_fps else None, self.target_fps, start, rng
        )
        out["fps"] = _check_fps(self._clip_fps(src_fps))
        if not decode:  # the frames a training clip can reach: any with a random start, else the first clip's
            reach = max(indices) + 1 if self.use_latents or self.use_kd else total
            self._check_members(raw, info, reach, out)
            return out
        frames = everything[indices] if everything is not None else decode_video(data, indices)[0]
        frames = resize_crop(frames, self.height, self.width)
        if not self.use_latents:
            out["video"] = _to_tensor(frames)
        if self.modality is not None and "control_latent" not in out and "control" not in out:
            control = self._control(raw, indices, frames, info, rng)
            if control.shape != frames.shape:
                raise ValueError(f"control {control.shape} does not match the clip {frames.shape}")
            out["control"] = _to_tensor(control)
        if "mask.mp4" in raw:
            out["mask"] = self._mask(raw["mask.mp4"], indices)
        return out

    def _check_members(self, raw: dict, info, reach: int, out: dict) -> None:
        """`check`'s part for the control and the mask, which must cover the first `reach` frames."""
        m = self.modality
        if m is not None and "control_latent" not in out and "control" not in out:
            if f"{m}.mp4" in raw:
                _check_same_video(raw[f"{m}.mp4"], info, f"{m}.mp4")
            elif m == "keypoint" and "keypoint.json" in raw:
                per_frame = json.loads(raw["keypoint.json"])
                if not isinstance(per_frame, list) or len(per_frame) < reach:
                    raise ValueError(f"keypoint.json has no entry for frame {reach - 1}")
                np.asarray(per_frame[:reach], dtype=np.float32)  # ragged -> ValueError
            elif m not in _COMPUTABLE:
                raise KeyError(f"sample has no {m}.mp4" + (" or keypoint.json" if m == "keypoint" else ""))
        if "mask.mp4" in raw:
            _check_length(raw["mask.mp4"], reach, "mask.mp4")

    def _kd(self, raw: dict, out: dict) -> bool:
        """Put kd.safetensors into `out`; True when nothing else needs decoding."""
        kd = _tensors(raw["kd.safetensors"], "kd.safetensors")
        out["kd_noise"] = _check_ndim(kd["noise"], 4, "noise")
        if "states" in kd:
            states, t = _check_ndim(kd["states"], 5, "states"), kd["t"]
            if t.shape != states.shape[:1] or states.shape[1:] != out["kd_noise"].shape:
                raise ValueError(f"kd states {tuple(states.shape)} / t {tuple(t.shape)} do not fit the noise")
            out["kd_states"], out["kd_t"] = states, t.float()
        if "x0" in kd:
            out["latent"] = _check_ndim(kd["x0"], 4, "x0")
        name = f"control.{self.modality}"
        if self.modality is not None and name in kd:
            control = _check_ndim(kd[name], 4, name)
            if control.dtype != torch.uint8 or control.shape[0] != 3:
                raise ValueError(
                    f"{name} must be (3, T, H, W) uint8 pixels, got {control.dtype} {tuple(control.shape)}"
                )
            if tuple(control.shape[1:]) != (self.num_frames, self.height, self.width):
                raise ValueError(
                    f"{name} is {tuple(control.shape[1:])} (T, H, W); the datamodule asks for "
                    f"{(self.num_frames, self.height, self.width)}: set num_frames/height/width to the KD data's"
                )
            out["control"] = control
        return "latent" in out and (self.modality is None or "control" in out)

    def _mask(self, data: bytes, indices: list[int]) -> torch.Tensor:
        return torch.from_numpy(mask_video(data, indices, self.height, self.width))[None]

    def _clip_fps(self, src_fps: float) -> float:
        return float(self.target_fps) if self.target_fps else float(src_fps) / self.stride

    def _control(self, raw, indices, frames, info, rng) -> np.ndarray:
        m = self.modality
        if f"{m}.mp4" in raw:
            _check_same_video(raw[f"{m}.mp4"], info, f"{m}.mp4")
            interpolation = CONTROL_INTERPOLATION[m]
            return load_control_video(raw[f"{m}.mp4"], indices, self.height, self.width, interpolation)
        if m in _COMPUTABLE:
            return compute_control(m, frames, rng=rng, preset=self.control_preset)
        if m == "keypoint" and "keypoint.json" in raw:
            per_frame = json.loads(raw["keypoint.json"])
            if not isinstance(per_frame, list) or max(indices) >= len(per_frame):
                raise ValueError(f"keypoint.json has no entry for frame {max(indices)}")
            kp = np.asarray([per_frame[i] for i in indices], dtype=np.float32)  # ragged -> ValueError
            video = render_keypoints(kp, info.height, info.width)  # source pixels, then as the clip
            return resize_crop(video, self.height, self.width, CONTROL_INTERPOLATION[m])
        raise KeyError(f"sample has no {m}.mp4" + (" or keypoint.json" if m == "keypoint" else ""))


def _check_same_video(data: bytes, clip, name: str) -> None:
    """A control video must have its clip's frame size and length (as far as the containers
    tell): anything else is another video or a misaligned one, and resizing would hide that."""
    ctl = probe(data)
    if (ctl.width, ctl.height) != (clip.width, clip.height):
        raise ValueError(f"{name} is {ctl.width}x{ctl.height}, its clip {clip.width}x{clip.height}")
    if ctl.frames > 0 and clip.frames > 0 and ctl.frames != clip.frames:
        raise ValueError(f"{name} has {ctl.frames} frames, its clip {clip.frames}")


def _check_length(data: bytes, needed: int, name: str) -> None:
    """A per-frame video member must open and, where its container says, have `needed` frames."""
    frames = probe(data).frames
    if 0 < frames < needed:
        raise VideoDecodeError(f"{name} has {frames} frames, {needed} are needed")


def _check_fps(fps: float) -> float:
    if not fps > 0 or not math.isfinite(fps):
        raise ValueError(f"bad fps {fps}")
    return fps


def _json(raw: dict) -> dict:
    if "json" not in raw:
        return {}
    meta = json.loads(raw["json"])
    if not isinstance(meta, dict):
        raise ValueError(f"json is a {type(meta).__name__}, not an object")
    return meta


def _caption(raw: dict, meta: dict) -> str:
    if "txt" in raw:
        return raw["txt"].decode("utf-8").strip()
    caption = meta.get("caption")
    if not isinstance(caption, str):
        raise KeyError("sample has no caption (no txt, no caption in json)")
    return caption.strip()


def _fps_from(meta: dict, raw: dict) -> float:
    fps = meta.get("fps")
    if isinstance(fps, (int, float)) and fps > 0:
        return float(fps)
    if "mp4" in raw and (fps := probe(raw["mp4"]).fps) > 0:
        return fps
    raise KeyError("no fps: neither json nor mp4 gives one")


def _tensors(data: bytes, name: str) -> dict[str, torch.Tensor]:
    try:
        return load_safetensors(data)
    except SafetensorError as e:
        raise ValueError(f"{name}: {e}") from e


def _check_ndim(t: torch.Tensor, ndim: int, name: str) -> torch.Tensor:
    if t.ndim != ndim:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, want {ndim} dims")
    return t


def _to_tensor(frames: np.ndarray) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (3, T, H, W) uint8."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2).contiguous()


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------


def collate(samples: Sequence[dict], skipped: int = 0) -> dict:
    """Stack decoded samples into a batch dict (see the module doc)."""
    first = samples[0]
    batch: dict[str, Any] = {
        "key": [s["key"] for s in samples],
        "caption": [s["caption"] for s in samples],
        "fps": torch.tensor([s["fps"] for s in samples], dtype=torch.float32),
    }
    for name in ("video", "control", "latent", "control_latent", "kd_noise", "kd_states", "kd_t"):
        if name in first:
            batch[name] = torch.stack([s[name] for s in samples])
    if any("mask" in s for s in samples):
        ref = next(s for s in samples if "mask" in s)["mask"]
        batch["mask"] = torch.stack([s.get("mask", torch.ones_like(ref)) for s in samples])
    if "text_emb" in first:
        length = max(s["text_emb"].shape[0] for s in samples)
        emb = first["text_emb"].new_zeros((len(samples), length, first["text_emb"].shape[1]))
        mask = torch.zeros((len(samples), length), dtype=torch.bool)
        for i, s in enumerate(samples):
            n = s["text_emb"].shape[0]
            emb[i, :n], mask[i, :n] = s["text_emb"], s["text_mask"]
        batch["text_emb"], batch["text_mask"] = emb, mask
    batch["skipped"] = torch.tensor(skipped, dtype=torch.int64)
    return batch


def check_fits(batch: list[dict], sample: dict) -> None:
    """Raise ValueError if `sample` cannot be stacked with the samples already in `batch`."""
    if not batch:
        return
    ref = batch[0]
    for name in ("video", "control", "latent", "control_latent", "mask", "kd_noise", "kd_states", "kd_t"):
        if name in sample and name in ref and sample[name].shape != ref[name].shape:
            shapes = tuple(sample[name].shape), tuple(ref[name].shape)
            raise ValueError(f"{name} shape {shapes[0]} differs from the batch's {shapes[1]}")
        if name in ("latent", "control_latent", "kd_states") and (name in sample) != (name in ref):
            raise ValueError(f"{name} present in some samples of the batch only")
    if "text_emb" in sample and sample["text_emb"].shape[1:] != ref["text_emb"].shape[1:]:
        raise ValueError("text_emb width differs from the batch's")
    if sample["fps"] <= 0 or not math.isfinite(sample["fps"]):
        raise ValueError(f"bad fps {sample['fps']}")
