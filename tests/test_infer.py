"""`vidistill infer` and `vidistill evaluate` on a tiny model, tiny videos and the pixel tokenizer."""

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules.codec import decode_video
from modules.denoiser import Denoiser
from modules.nets import preset
from modules.pipeline import Pipeline, build_sampler
from modules.sampling import GenerationSettings, SamplerConfig
from modules.spec import load_specs
from tests.helpers.infer import H, W, long_spec, make_clips, make_model, run_infer
from tests.helpers.infer import write_spec as _write


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return make_model(tmp_path_factory.mktemp("model"))


@pytest.fixture
def clips(tmp_path) -> Path:
    return make_clips(tmp_path)


MULTICONTROL = """{
    // the seed document's style: comments and a trailing comma
    "name": "multi",
    "prompt": "a red square slides over a grey floor",
    "video_path": "input.mp4",
    "resolution": "32x48",
    "max_frames": 4,
    "num_steps": 2,
    "guidance": 1,
    "show_control_condition": true,
    "edge": {"mask_path": "mask.mp4", "preset_edge_threshold": "low"},
    "vis": {"control_weight": 0.5},
}"""


def test_multicontrol_spec_with_mask_writes_outputs(model, clips, tmp_path):
    (clips / "spec.json").write_text(MULTICONTROL)
    out = tmp_path / "out"
    assert (
        run_infer("-i", clips / "spec.json", "-o", out, "--model", model, "--disable-guardrails", "--lossless", "true")
        == 0
    )
    info = json.loads((out / "multi.json").read_text())
    assert info["nfe"] == 2 * 2 and info["frames"] == 4 and info["spec"]["edge"]["preset_edge_threshold"] == "low"
    for name in info["outputs"]:
        assert (out / name).is_file(), name
    for name in ("multi.mp4", "multi.webm", "multi.mkv", "multi_control_edge.mp4", "multi_compare.webm"):
        frames, _ = decode_video((out / name).read_bytes())
        assert len(frames) == 4, name
    assert (out / "multi.txt").read_text().strip() == "a red square slides over a grey floor"
    # evaluate scores it against the recomputed controls
    results = evaluate_dir(out, tmp_path / "eval")
    row = results["runs"][0]["rows"][0]
    assert 0 <= row["edge_f1"] <= 1 and -1 <= row["blur_ssim"] <= 1 and row["nfe"] == 4
    assert (tmp_path / "eval" / "metrics.svg").read_text().startswith("<svg")
    assert "Edge F1" in (tmp_path / "eval" / "metrics.md").read_text()


def evaluate_dir(out, dest):
    from tools.evaluate import evaluate

    return evaluate([str(out)], out=str(dest))


def test_compiled_blocks_generate_the_same_video(model, clips, tmp_path):
    # `--compile` compiles every DiT block; aot_eager runs Dynamo's capture of them without
    # inductor's minutes of CPU compilation. Lossless outputs compare the generated frames.
    (clips / "spec.json").write_text(MULTICONTROL)
    from torch._dynamo.utils import counters

    counters.clear()
    videos = {}
    for flag in ("false", "aot_eager"):
        out = tmp_path / flag
        assert (
            run_infer(
                "-i",
                clips / "spec.json",
                "-o",
                out,
                "--model",
                model,
                "--disable-guardrails",
                "--lossless",
                "true",
                "--compile",
                flag,
            )
            == 0
        )
        videos[flag] = decode_video((out / "multi.mkv").read_bytes())[0].astype(int)
    assert counters["stats"]["unique_graphs"] > 0  # the second run did compile
    assert np.abs(videos["false"] - videos["aot_eager"]).max() <= 1  # rounding to 8 bits at most


def test_the_mask_and_weights_change_the_video(model, clips):
    specs, _ = load_specs(_write(clips, MULTICONTROL))
    settings = GenerationSettings.load(model)
    pipe = Pipeline(
        build_sampler(model, settings),
        settings,
        {c: torch.device("cpu") for c in ("text_encoder", "tokenizer", "dit")},
    )
    full = pipe.run(specs[0]).video
    specs[0].controls["edge"].mask_path = None
    no_mask = pipe.run(specs[0]).video
    assert not np.array_equal(full, no_mask)
    # the mask covers the left half: there the edge branch still acts in both runs
    assert (
        np.abs(full.astype(int) - no_mask.astype(int))[:, :, W // 2 + 4 :].mean()
        > np.abs(full.astype(int) - no_mask.astype(int))[:, :, : W // 2 - 4].mean()
    )


def test_invalid_spec_writes_nothing(model, clips, tmp_path, capsys):
    bad = MULTICONTROL.replace('"guidance": 1', '"gudiance": 1')
    out = tmp_path / "out"
    code = run_infer("-i", _write(clips, bad), "-o", out, "--model", model, "--disable-guardrails")
    assert code not in (0, None)
    assert "gudiance" in str(code) and "guidance" in str(code)
    assert not out.exists()


def test_blocklisted_prompt_is_refused(model, clips, tmp_path):
    words = tmp_path / "words.txt"
    words.write_text("# test list\nsquare\n")
    out = tmp_path / "out"
    code = run_infer("-i", _write(clips, MULTICONTROL), "-o", out, "--model", model, "--blocklist", words)
    assert code not in (0, None) and "square" in str(code)
    assert not out.exists()


def test_keep_going_runs_the_valid_specs(model, clips, tmp_path, capsys):
    good = {
        "name": "ok",
        "prompt": "a square",
        "video_path": "input.mp4",
        "resolution": "32x48",
        "max_frames": 2,
        "num_steps": 1,
        "guidance": 0,
        "edge": {},
    }
    (clips / "broken.mp4").write_bytes(b"not a video")
    refused = [dict(good, name="nobranch", seg={}), dict(good, name="broken", video_path="broken.mp4")]
    lines = [json.dumps(spec) for spec in [good, dict(good, name="bad", guidance=9), *refused]]
    out = tmp_path / "out"
    code = run_infer(
        "-i",
        _write(clips, "\n".join(lines), "batch.jsonl"),
        "-o",
        out,
        "--model",
        model,
        "--disable-guardrails",
        "--keep-going",
    )
    assert code == 1
    assert (out / "ok.json").is_file() and not (out / "bad.json").exists()
    err = capsys.readouterr().err
    assert "bad" in err and "nobranch" in err and "broken" in err
    assert "infer: 1 of 4 spec(s) generated" in err  # each spec counted once, refused or not


def test_an_unwritable_output_folder_is_refused_before_generating(model, clips, tmp_path, monkeypatch):
    from modules.pipeline import Pipeline

    monkeypatch.setattr(Pipeline, "run", lambda *a: pytest.fail("generated before checking the output folder"))
    (tmp_path / "file").write_text("")
    code = run_infer("-i", _write(clips, MULTICONTROL), "-o", tmp_path / "file" / "out", "--model", model)
    assert str(code).splitlines() == [
        f"vidistill infer: error: output folder {tmp_path / 'file' / 'out'} cannot be written: Not a directory"
    ]


def test_a_full_disk_leaves_no_output_under_its_final_name(model, clips, tmp_path, monkeypatch, capsys):
    """The disk fills up while the lossless copy is written: the spec fails naming the file and
    "No space left on device", and no output of it (nor a temporary file) is left behind."""
    import errno

    from datamodules import codec

    real, calls = codec._write, []

    def fill_up(path, frames, *args):
        calls.append(path)
        if path.endswith(".mkv"):
            Path(path).write_bytes(b"half a video")
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, frames, *args)

    monkeypatch.setattr(codec, "_write", fill_up)
    out = tmp_path / "out"
    code = run_infer(
        "-i", _write(clips, MULTICONTROL), "-o", out, "--model", model, "--disable-guardrails", "--lossless"
    )
    assert code == 1 and len(calls) == 3
    assert f"No space left on device: '{out / 'multi.mkv'}'" in capsys.readouterr().err
    assert list(out.iterdir()) == []


def test_long_video_chunks_and_reused_latents_equal_the_round_trip(model, clips):
    specs, _ = load_specs(long_spec(clips))
    settings = GenerationSettings.load(model)
    cpu = {c: torch.device("cpu") for c in ("text_encoder", "tokenizer", "dit")}
    gen = build_sampler(model, settings)
    trip = Pipeline(gen, settings, cpu).run(specs[0])
    reuse = Pipeline(gen, settings, cpu, reuse_latents=True).run(specs[0])
    assert trip.plan.starts == [0, 3, 6] and trip.video.shape == (10, H, W, 3)
    assert np.array_equal(trip.video, reuse.video)
    # chunks are chained: chunk k+1 starts with the frame chunk k ended on
    one = Pipeline(gen, settings, cpu).run(load_specs(long_spec(clips, max_frames=4))[0][0])
    assert np.array_equal(one.video, trip.video[:4])


def test_video2world_continues_the_input_and_text2world_needs_nothing(model, clips, tmp_path):
    settings = GenerationSettings.load(model)
    cpu = {c: torch.device("cpu") for c in ("text_encoder", "tokenizer", "dit")}
    gen = build_sampler(model, settings)
    spec = {
        "name": "v2w",
        "prompt": "a square",
        "video_path": "input.mp4",
        "resolution": "32x48",
        "max_frames": 3,
        "num_video_frames_per_chunk": 4,
        "num_conditional_frames": 1,
        "num_steps": 2,
        "guidance": 0,
    }
    specs, _ = load_specs(_write(clips, json.dumps(spec)), require_control=False)
    job = Pipeline(gen, settings, cpu, mode="video2world").run(specs[0])
    assert job.video.shape == (4, H, W, 3)
    assert np.array_equal(job.video[0], job.inputs.video[-1])  # the lossless tokenizer keeps it exactly
    out = tmp_path / "t2w"
    t2w = {"name": "t2w", "prompt": "a square", "resolution": "32x48", "max_frames": 3, "num_steps": 2, "guidance": 2}
    assert (
        run_infer(
            "-i",
            _write(clips, json.dumps(t2w), "t2w.json"),
            "-o",
            out,
            "--model",
            model,
            "--mode",
            "text2world",
            "--disable-guardrails",
        )
        == 0
    )
    assert json.loads((out / "t2w.json").read_text())["frames"] == 3


def test_student_sampler_uses_its_t_list_or_the_requested_steps(model, clips, tmp_path):
    settings = GenerationSettings.load(model)
    settings.sampler = asdict(SamplerConfig(sampler="student", t_list=(1.0, 0.75, 0.5, 0.25), shift=3.0))
    from modules.pipeline import nfe, spec_sampler

    spec = load_specs(long_spec(clips, num_steps=4))[0][0]
    assert nfe(spec_sampler(settings, spec)) == 4
    spec.num_steps = 1
    assert spec_sampler(settings, spec).t_list == (1.0,)


def test_a_student_asked_for_the_default_steps_runs_its_t_list_and_says_so(model, clips):
    """A spec written for the teacher (num_steps left at Transfer2.5's 35) runs the student's own
    4-step t-list, with a warning naming what runs and how to ask for other steps."""
    import warnings

    settings = GenerationSettings.load(model)
    t_list = (1.0, 0.75, 0.5, 0.25)
    settings.sampler = asdict(SamplerConfig(sampler="student", t_list=t_list, shift=3.0))
    spec = {"name": "s", "prompt": "a square", "video_path": "input.mp4", "resolution": "32x48", "max_frames": 2}
    specs, _ = load_specs(_write(clips, json.dumps(dict(spec, edge={}))))
    assert specs[0].num_steps == 35
    pipe = Pipeline(
        build_sampler(model, settings), settings, {c: torch.device("cpu") for c in ("text_encoder", "tokenizer", "dit")}
    )
    said = r"distilled for 4 steps; num_steps 35 \(the Transfer2.5 default\) runs its 4-step t-list.*--num-steps N"
    with pytest.warns(UserWarning, match=said):
        job = pipe.prepare(specs[0])
    assert job.sampler.t_list == t_list and job.sampler.sampler == "student"
    specs[0].num_steps = 4  # its own step count: nothing to say
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pipe.prepare(specs[0]).sampler.t_list == t_list


def invert(video):
    """A stand-in depth annotator."""
    return 255 - video


def test_an_annotator_hook_computes_a_control_without_control_path(clips):
    from modules.pipeline import load_inputs
    from modules.spec import SpecError

    spec = {
        "name": "d",
        "prompt": "a square",
        "video_path": "input.mp4",
        "resolution": "32x48",
        "max_frames": 3,
        "depth": {},
    }
    path = _write(clips, json.dumps(spec))
    with pytest.raises(SpecError, match="annotator"):
        load_specs(path)
    specs, _ = load_specs(path, annotated=("depth",))
    inputs = load_inputs(specs[0], annotators={"depth": invert})
    assert np.array_equal(inputs.controls["depth"], 255 - inputs.video)


def test_make_specs_turns_shard_clips_into_specs(tmp_path):
    from tools.make_shards import make_shards
    from tools.make_specs import make_specs

    make_shards(
        out=str(tmp_path / "shards"),
        synthetic="video",
        num_samples=3,
        samples_per_shard=2,
        num_frames=4,
        height=32,
        width=48,
        progress=False,
    )
    path = make_specs(str(tmp_path / "shards"), out=str(tmp_path / "specs"), controls="edge,vis", num=2, num_steps=4)
    specs, _ = load_specs(path)
    assert len(specs) == 2 and all(set(s.controls) == {"edge", "vis"} and s.num_steps == 4 for s in specs)
    assert specs[0].resolution == "32x48" and specs[0].max_frames == 4 and specs[0].video_path.is_file()


def test_video2world_continues_from_several_conditioning_frames(model, clips, tmp_path):
    """num_conditional_frames 2 (Transfer2.5's most): the output starts with the input's last
    frames, kept exactly (the pixel tokenizer is lossless and conditioning frames' x0 is returned
    as given), and continues with generated ones: 2 pixel frames for 2 latent frames, and 4 with
    a tokenizer that packs 2 frames into each latent frame."""
    two_frames = tmp_path / "t2"
    cfg = preset("tiny", latent_channels=24)
    cfg.control.channels, cfg.modalities = 24, ["edge"]
    Denoiser.build(cfg, seed=0).save_pretrained(two_frames)
    GenerationSettings(
        tokenizer={"kind": "pixel", "path": None, "options": {"spatial": 2, "temporal": 2}},
        text={"encoder": "tiny", "max_length": 16},
        sampler=asdict(SamplerConfig(steps=2, guidance=0.0, shift=3.0)),
    ).save(two_frames)
    spec = {"name": "v2w", "prompt": "a square", "video_path": "input.mp4", "resolution": "32x48", "max_frames": 7}
    spec |= {"num_video_frames_per_chunk": 8, "num_conditional_frames": 2, "num_steps": 2, "guidance": 0}
    specs, _ = load_specs(_write(clips, json.dumps(spec)), require_control=False)
    cpu = {c: torch.device("cpu") for c in ("text_encoder", "tokenizer", "dit")}
    for net, pixels in ((model, 2), (str(two_frames), 4)):
        settings = GenerationSettings.load(net)
        job = Pipeline(build_sampler(net, settings), settings, cpu, mode="video2world").run(specs[0])
        assert job.plan.cond_latents == 2 and job.plan.overlap == pixels and job.video.shape == (8, H, W, 3)
        assert np.array_equal(job.video[:pixels], job.inputs.video[-pixels:])
        assert not np.array_equal(job.video[pixels], job.inputs.video[-1])  # then new frames


def test_prompt_upsampler_runs_with_guardrails_disabled(model, clips, tmp_path):
    spec = {"name": "up", "prompt": "a square", "video_path": "input.mp4", "resolution": "32x48", "max_frames": 2}
    spec |= {"num_steps": 1, "guidance": 0, "edge": {}}
    out = tmp_path / "out"
    args = ["-i", _write(clips, json.dumps(spec)), "-o", out, "--model", model, "--disable-guardrails"]
    assert run_infer(*args, "--prompt_upsampler", "tests.test_guardrails:StubUpsampler") == 0
    assert (out / "up.txt").read_text().strip() == "a square in warm evening light"
    info = json.loads((out / "up.json").read_text())
    assert info["spec"]["prompt"] == "a square in warm evening light" and info["guardrails"] is False
