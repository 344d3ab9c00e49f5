"""Inference guardrails: blocklist matching, face pixelation, hooks and the Guardrails bundle."""

import cv2
import numpy as np
import pytest

from modules.guardrails import FaceBlur, Guardrails, HaarFaceDetector, PromptBlocklist, SafetyChecker, load_hook


class StubChecker:
    """Refuses any prompt mentioning 'forbidden' and any all-black video."""

    def check_prompt(self, prompt):
        return "stub: forbidden prompt" if "forbidden" in prompt else None

    def check_video(self, video):
        return "stub: black video" if not video.any() else None


class FixedBoxes:
    """Detector returning the given boxes, one list per call (the last one repeats)."""

    def __init__(self, *box_lists):
        self.box_lists, self.calls = list(box_lists), 0

    def detect(self, frame_rgb):
        self.calls += 1
        return self.box_lists[min(self.calls - 1, len(self.box_lists) - 1)]


def noise(t=1, h=64, w=64, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (t, h, w, 3), dtype=np.uint8)


def test_blocklist_whole_words_case_and_punctuation():
    bl = PromptBlocklist(["ass", "Mass Shooting"])
    reason = bl.check("a donkey, also called an ASS!")
    assert reason is not None and "'ass'" in reason
    assert bl.check("a class of students") is None  # substring only
    assert bl.check("Scene of a MASS\t  shooting...") is not None
    assert bl.check("mass-shooting") is not None
    assert "'Mass Shooting'" in bl.check("mass shooting")
    assert bl.check("a mass of shootings") is None
    with pytest.raises(ValueError):
        PromptBlocklist(["!!!"])


def test_blocklist_from_file_and_default(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text("# header\n\n  gore  \n# skipped\ntorture # trailing note\n\n")
    bl = PromptBlocklist.from_file(path)
    assert sorted(bl.terms.values()) == ["gore", "torture"]
    assert bl.check("header") is None and bl.check("Gore.") is not None
    default = PromptBlocklist.default()
    assert len(default) > 5
    assert default.check("a cat playing piano") is None


def test_face_blur_changes_box_only():
    video = noise(t=2)
    blur = FaceBlur(FixedBoxes([(20, 16, 20, 20)]), margin=0.2)
    out = blur(video)
    x0, y0, x1, y1 = blur.region((20, 16, 20, 20), 64, 64)
    assert (x0, y0, x1, y1) == (16, 12, 44, 40)
    inside = np.zeros(video.shape[1:3], bool)
    inside[y0:y1, x0:x1] = True
    assert np.array_equal(out[:, ~inside], video[:, ~inside])
    assert out[:, inside].astype(float).var() < 0.2 * video[:, inside].astype(float).var()
    assert np.array_equal(video, noise(t=2))  # input untouched


def test_face_blur_clips_boxes_outside_frame():
    video = noise(h=32, w=48)
    out = FaceBlur(FixedBoxes([(-10, -5, 20, 20), (40, 25, 30, 30), (100, 100, 5, 5)]))(video)
    assert out.shape == video.shape
    assert not np.array_equal(out[0, :10, :10], video[0, :10, :10])
    assert np.array_equal(out[0, 20:24, 20:24], video[0, 20:24, 20:24])


def test_face_blur_every_reuses_boxes():
    detector = FixedBoxes([(0, 0, 16, 16)], [(40, 40, 16, 16)])
    out = FaceBlur(detector, margin=0.0, every=2)(noise(t=4))
    video = noise(t=4)
    assert detector.calls == 2  # frames 0 and 2
    assert not np.array_equal(out[1, :16, :16], video[1, :16, :16])  # reused from frame 0
    assert np.array_equal(out[1, 40:, 40:], video[1, 40:, 40:])
    assert not np.array_equal(out[3, 40:56, 40:56], video[3, 40:56, 40:56])


def test_haar_detector_runs():
    # OpenCV 5 dropped the cascades: pyproject pins opencv-python-headless < 5 for them
    frame = noise(h=96, w=96)[0]
    cv2.circle(frame, (48, 48), 30, (200, 170, 150), -1)
    boxes = HaarFaceDetector().detect(frame)
    assert isinstance(boxes, list)
    assert all(len(b) == 4 and all(isinstance(v, int) for v in b) for b in boxes)


def test_guardrails_disabled_and_safety_hook():
    video = noise()
    off = Guardrails.disabled()
    assert off.check_prompt("forbidden gore") is None and off.check_video(video) is None
    assert off.prepare_prompt("p") == "p" and off.postprocess(video) is video

    g = Guardrails(blocklist=PromptBlocklist(["gore"]), safety=[StubChecker()])
    assert isinstance(g.safety[0], SafetyChecker)
    assert "blocklist" in g.check_prompt("forbidden gore")  # blocklist first
    assert g.check_prompt("forbidden fruit") == "stub: forbidden prompt"
    assert g.check_prompt("fruit") is None
    assert g.check_video(np.zeros_like(video)) == "stub: black video"
    assert g.check_video(video) is None


def test_load_hook():
    assert isinstance(load_hook("tests.test_guardrails:StubChecker"), StubChecker)
    with pytest.raises(ImportError, match="no.such:Thing"):
        load_hook("no.such:Thing")
    with pytest.raises(ImportError, match="Missing"):
        load_hook("tests.test_guardrails:Missing")
    with pytest.raises(ValueError, match="package.module:ClassName"):
        load_hook("no_colon")


class StubUpsampler:
    """Rewrites "forbidden" away and appends a detail that is blocklisted when asked to ("gore")."""

    def upsample(self, prompt):
        detail = " with gore" if "gory" in prompt else " in warm evening light"
        return prompt.replace("forbidden", "permitted") + detail


def test_upsampler_works_without_guardrails_and_both_prompts_are_checked():
    from modules.inference import make_guardrails

    # --disable-guardrails keeps the upsampler: prompts are rewritten, nothing is checked
    off = make_guardrails(True, prompt_upsampler="tests.test_guardrails:StubUpsampler")
    assert isinstance(off.upsampler, StubUpsampler) and not off.enabled
    assert off.prompt("a forbidden gory cat") == ("a permitted gory cat with gore", None)
    assert make_guardrails(True).upsampler is None and make_guardrails(True).prompt("a cat") == ("a cat", None)

    g = Guardrails(blocklist=PromptBlocklist(["forbidden", "gore"]), upsampler=StubUpsampler())
    assert g.enabled
    assert g.prompt("a cat") == ("a cat in warm evening light", None)
    # the user's prompt is checked before the upsampler could rewrite the refused word away
    prompt, reason = g.prompt("a forbidden cat")
    assert prompt == "a forbidden cat" and "'forbidden'" in reason
    # and the upsampled prompt after: here the upsampler brings in a listed word itself
    prompt, reason = g.prompt("a gory cat")
    assert prompt == "a gory cat with gore" and reason.startswith("upsampled prompt:") and "'gore'" in reason
    on = make_guardrails(False, prompt_upsampler="tests.test_guardrails:StubUpsampler")
    assert isinstance(on.upsampler, StubUpsampler) and on.blocklist is not None
