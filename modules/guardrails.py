"""Inference guardrails: prompt blocklist, face blurring and hooks for real safety models.

Everything here is model-free and needs no download: a word/phrase blocklist on the
prompt and face pixelation on the generated video with OpenCV's Haar cascade. Real
checkers (a prompt classifier, a video safety model, a prompt upsampler) plug in
through small protocols and are loaded from a "package.module:ClassName" spec.

Typical use in an inference loop::

    g = Guardrails.default()
    prompt, reason = g.prompt(prompt)    # checks the prompt, upsamples it, checks the result
    if reason is not None: refuse(reason)
    video = generate(prompt)
    if (reason := g.check_video(video)) is not None: refuse(reason)
    video = g.postprocess(video)

The prompt upsampler is no guardrail: it rewrites prompts with the checks on or off
(`Guardrails.disabled(upsampler)` keeps it and checks nothing).
"""

from __future__ import annotations

import importlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import cv2
import numpy as np

DEFAULT_BLOCKLIST = Path(__file__).parent / "blocklist.txt"

Box = tuple[int, int, int, int]

_NON_WORD = re.compile(r"[\W_]+")


def _normalize(text: str) -> str:
    # Punctuation and any run of whitespace become one space, so "Gore!" and
    # "mass   shooting" match, and padding with spaces gives whole-word matching
    # by plain substring search ("class" never contains " ass ").
    return " " + _NON_WORD.sub(" ", text.casefold()).strip() + " "


class PromptBlocklist:
    """Refuse prompts that contain a listed word or phrase (case-insensitive, whole words)."""

    def __init__(self, words: list[str]):
        self.terms: dict[str, str] = {}
        for word in words:
            key = _normalize(word)
            if not key.strip():
                raise ValueError(f"blocklist term {word!r} has no letters or digits")
            self.terms.setdefault(key, word.strip())

    @classmethod
    def from_file(cls, path: str | Path) -> PromptBlocklist:
        """Read one term per line; blank lines and '#' comments (whole or trailing) are skipped."""
        words = []
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            term = line.split("#", 1)[0].strip()
            if term:
                words.append(term)
        return cls(words)

    @classmethod
    def default(cls) -> PromptBlocklist:
        """The placeholder list shipped as modules/blocklist.txt."""
        return cls.from_file(DEFAULT_BLOCKLIST)

    def check(self, prompt: str) -> str | None:
        """None if the prompt is allowed, else a reason naming the matched term."""
        text = _normalize(prompt)
        for key, term in self.terms.items():
            if key in text:
                return f"prompt refused by the blocklist: contains {term!r}"
        return None

    def __len__(self) -> int:
        return len(self.terms)


@runtime_checkable
class FaceDetector(Protocol):
    def detect(self, frame_rgb: np.ndarray) -> list[Box]:
        """Face boxes (x, y, w, h) in pixels for one (H, W, 3) uint8 RGB frame."""


class HaarFaceDetector:
    """Frontal-face detector on OpenCV's bundled Haar cascade (fast, CPU, no download).

    Args:
        cascade_path: cascade XML; defaults to OpenCV's haarcascade_frontalface_default.xml.
        scale_factor: image pyramid step; smaller finds more faces but is slower.
        min_neighbors: overlapping hits a detection needs; higher gives fewer false positives.
        min_size: smallest face (w, h) in pixels that is searched for.
    """

    FILE = "haarcascade_frontalface_default.xml"

    def __init__(
        self,
        cascade_path: str | Path | None = None,
        scale_factor: float = 1.1,
        min_neighbors: int = 5,
        min_size: tuple[int, int] = (24, 24),
    ):
        if not hasattr(cv2, "CascadeClassifier"):
            # OpenCV 5 moved the Haar cascades out of the main wheel.
            raise RuntimeError(
                f"OpenCV {cv2.__version__} has no cv2.CascadeClassifier; install "
                "'opencv-python-headless>=4.9,<5' or pass FaceBlur another FaceDetector"
            )
        if cascade_path is None:
            data = getattr(cv2, "data", None)
            if data is None:
                raise RuntimeError(
                    f"this OpenCV build has no cv2.data; download {self.FILE} (from the "
                    "OpenCV repository, data/haarcascades) and pass its path as cascade_path"
                )
            cascade_path = Path(data.haarcascades) / self.FILE
        if not Path(cascade_path).is_file():
            raise FileNotFoundError(
                f"Haar cascade not found: {cascade_path}; pass cascade_path pointing at {self.FILE}"
            )
        self.cascade = cv2.CascadeClassifier(str(cascade_path))
        if self.cascade.empty():
            raise RuntimeError(f"OpenCV could not load the Haar cascade {cascade_path}")
        self.scale_factor, self.min_neighbors, self.min_size = scale_factor, min_neighbors, min_size

    def detect(self, frame_rgb: np.ndarray) -> list[Box]:
        gray = cv2.equalizeHist(cv2.cvtColor(frame_rgb, cv2.COLOR_RGB2GRAY))
        found = self.cascade.detectMultiScale(
            gray, scaleFactor=self.scale_factor, minNeighbors=self.min_neighbors, minSize=tuple(self.min_size)
        )
        return [tuple(int(v) for v in box) for box in found]


class FaceBlur:
    """Pixelate detected faces in a (T, H, W, 3) uint8 video; all other pixels are untouched.

    Args:
        detector: a FaceDetector; defaults to HaarFaceDetector().
        strength: mosaic cell size as a fraction of the box's longer side (0.125 gives
            about 8 cells across a face); larger is coarser.
        margin: each box is grown by this fraction of its size on every side, since
            detectors box the face tightly and hair, ears and chin still identify.
        every: detect on every k-th frame only and reuse its boxes for the next k-1.
    """

    def __init__(
        self, detector: FaceDetector | None = None, strength: float = 0.125, margin: float = 0.2, every: int = 1
    ):
        if not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.detector = detector if detector is not None else HaarFaceDetector()
        self.strength, self.margin, self.every = strength, margin, every

    def region(self, box: Box, height: int, width: int) -> tuple[int, int, int, int] | None:
        """The margin-grown box clipped to the frame as (x0, y0, x1, y1), or None if empty."""
        x, y, w, h = box
        mx, my = round(w * self.margin), round(h * self.margin)
        x0, y0 = max(0, x - mx), max(0, y - my)
        x1, y1 = min(width, x + w + mx), min(height, y + h + my)
        return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None

    def _pixelate(self, frame: np.ndarray, x0: int, y0: int, x1: int, y1: int) -> None:
        patch = frame[y0:y1, x0:x1]
        h, w = patch.shape[:2]
        cell = max(1, math.ceil(self.strength * max(h, w)))
        # Area averaging then nearest upsampling: each cell is one flat colour, which
        # discards the detail inside it (a Gaussian blur can be partly deconvolved).
        small = cv2.resize(patch, (max(1, w // cell), max(1, h // cell)), interpolation=cv2.INTER_AREA)
        frame[y0:y1, x0:x1] = cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST)

    def __call__(self, video: np.ndarray) -> np.ndarray:
        if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8:
            raise ValueError(f"expected a (T, H, W, 3) uint8 video, got {video.shape} {video.dtype}")
        out = video.copy()
        height, width = video.shape[1:3]
        boxes: list[Box] = []
        for t in range(len(out)):
            if t % self.every == 0:
                boxes = list(self.detector.detect(video[t]))
            for box in boxes:
                region = self.region(box, height, width)
                if region is not None:
                    self._pixelate(out[t], *region)
        return out


@runtime_checkable
class SafetyChecker(Protocol):
    """A real safety model; each method returns None to allow, else a refusal reason."""

    def check_prompt(self, prompt: str) -> str | None: ...

    def check_video(self, video: np.ndarray) -> str | None: ...


@runtime_checkable
class PromptUpsampler(Protocol):
    """Rewrites a short prompt into a detailed one (e.g. a language model)."""

    def upsample(self, prompt: str) -> str: ...


@dataclass
class Guardrails:
    """The guardrails applied around one generation, and the prompt upsampler that runs with or
    without them; every part is optional."""

    blocklist: PromptBlocklist | None = None
    face_blur: FaceBlur | None = None
    safety: list[SafetyChecker] = field(default_factory=list)
    upsampler: PromptUpsampler | None = None

    @classmethod
    def default(cls, blocklist_path: str | Path | None = None) -> Guardrails:
        """Blocklist (the shipped list unless blocklist_path is given) plus Haar face blur."""
        blocklist = (
            PromptBlocklist.from_file(blocklist_path) if blocklist_path is not None else PromptBlocklist.default()
        )
        return cls(blocklist=blocklist, face_blur=FaceBlur(HaarFaceDetector()))

    @classmethod
    def disabled(cls, upsampler: PromptUpsampler | None = None) -> Guardrails:
        """No checks: every prompt and video passes unchanged, except that prompts are still
        upsampled when an upsampler is given (it is a prompt rewriter, not a check)."""
        return cls(upsampler=upsampler)

    @property
    def enabled(self) -> bool:
        """Whether anything is checked or blurred (recorded with every output); the upsampler
        does not count, as it checks nothing."""
        return bool(self.blocklist or self.face_blur or self.safety)

    def check_prompt(self, prompt: str) -> str | None:
        """Blocklist first (cheap), then each safety checker; the first reason wins."""
        if self.blocklist is not None and (reason := self.blocklist.check(prompt)) is not None:
            return reason
        for checker in self.safety:
            if (reason := checker.check_prompt(prompt)) is not None:
                return reason
        return None

    def prepare_prompt(self, prompt: str) -> str:
        """The upsampled prompt, or the prompt itself without an upsampler (no checks: `prompt`
        checks both)."""
        return self.upsampler.upsample(prompt) if self.upsampler is not None else prompt

    def prompt(self, prompt: str) -> tuple[str, str | None]:
        """(the prompt to generate from, None) or (it, the refusal reason).

        The user's prompt is checked before it is upsampled, so an upsampler cannot rewrite a
        refused request into an accepted one, and the upsampled prompt after, because an
        upsampler can introduce content of its own."""
        if (reason := self.check_prompt(prompt)) is not None:
            return prompt, reason
        upsampled = self.prepare_prompt(prompt)
        if upsampled != prompt and (reason := self.check_prompt(upsampled)) is not None:
            return upsampled, f"upsampled prompt: {reason}"
        return upsampled, None

    def check_video(self, video: np.ndarray) -> str | None:
        """The first safety checker's refusal reason for the generated video, or None."""
        for checker in self.safety:
            if (reason := checker.check_video(video)) is not None:
                return reason
        return None

    def postprocess(self, video: np.ndarray) -> np.ndarray:
        """Face-blurred copy of the video; the same array when face blur is off."""
        return self.face_blur(video) if self.face_blur is not None else video


def load_hook(spec: str) -> object:
    """Import "package.module:ClassName" and return ClassName() (a CLI plug-in point)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"hook spec must look like 'package.module:ClassName', got {spec!r}")
    try:
        target = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ImportError(f"cannot load hook {spec!r}: {e}") from e
    return target()
