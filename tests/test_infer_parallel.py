"""`vidistill infer` across devices and processes: two-device placement, offloading, a batch split
over two gloo ranks, and context parallelism (one spec's tokens over two ranks)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules.codec import decode_video
from modules.pipeline import Pipeline, build_sampler, placement_slots, run_placed
from modules.sampling import GenerationSettings
from modules.spec import load_specs
from tests.helpers import PATIENCE_S
from tests.helpers.infer import ROOT, free_port, long_spec, make_clips, make_model, run_infer
from tests.helpers.infer import write_spec as _write


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return make_model(tmp_path_factory.mktemp("model"))


@pytest.fixture
def clips(tmp_path) -> Path:
    return make_clips(tmp_path)


class Recorder:
    """A stand-in pipeline that records which phase ran in which placement slot."""

    def __init__(self, fail_prepare=()):
        self.log, self.fail_prepare = [], set(fail_prepare)

    def prepare(self, spec):
        if spec in self.fail_prepare:
            raise RuntimeError("broken input")
        self.log.append(("prepare", spec))
        return {"spec": spec}

    def denoise(self, job):
        self.log.append(("denoise", job["spec"]))
        return job

    def decode(self, job):
        self.log.append(("decode", job["spec"]))
        return job


def test_placement_pipelines_text_encoder_and_tokenizer_around_the_dit():
    slots = placement_slots(4)
    assert len(slots) == 6
    for t, (a, b) in enumerate(slots):
        if 1 <= t <= 4:  # while the DiT denoises spec t-1 ...
            assert b == [("denoise", t - 1)]
        if 2 <= t <= 3:  # ... the tokenizer decodes t-2 and the text encoder / tokenizer prepare t
            assert a == [("decode", t - 2), ("prepare", t)]
    done, failed = [], []
    rec = Recorder(fail_prepare={2})
    run_placed(rec, [0, 1, 2, 3], lambda job: done.append(job["spec"]), lambda spec, err: failed.append(spec))
    assert done == [0, 1, 3] and failed == [2]
    for i in done:
        assert rec.log.index(("prepare", i)) < rec.log.index(("denoise", i)) < rec.log.index(("decode", i))
    assert ("denoise", 2) not in rec.log


def test_batch_over_two_gloo_ranks_writes_every_output_once(model, clips, tmp_path):
    lines = [
        json.dumps(
            {
                "name": f"s{i}",
                "prompt": f"square {i}",
                "video_path": "input.mp4",
                "resolution": "32x48",
                "max_frames": 2,
                "num_steps": 1,
                "guidance": 0,
                "edge": {},
            }
        )
        for i in range(3)
    ]
    batch = _write(clips, "\n".join(lines), "batch.jsonl")
    out = tmp_path / "out"
    procs, port = [], str(free_port())  # one port for both ranks
    for rank in range(2):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            PYTHONPATH=str(ROOT),
        )
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tools.cli",
                    "infer",
                    "-i",
                    str(batch),
                    "-o",
                    str(out),
                    "--model",
                    model,
                    "--disable-guardrails",
                    "--device",
                    "cpu",
                ],
                cwd=tmp_path,
                env=env,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    errs = [p.communicate(timeout=PATIENCE_S)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errs
    infos = {f.stem: json.loads(f.read_text()) for f in out.glob("s*.json")}
    assert sorted(infos) == ["s0", "s1", "s2"]
    assert {n: i["rank"] for n, i in infos.items()} == {"s0": 0, "s1": 1, "s2": 0}
    assert "3 of 3 spec(s) generated" in errs[0]


def test_offload_gives_the_same_video_and_parks_components_on_the_cpu(model, clips):
    """--offload text_encoder,tokenizer,dit: the same video as without, and each component visits
    its device only for its phase (and the tokenizer during the DiT's chunk round trips). On a
    machine without a GPU the device is "cpu:0", which a module's `to` sees apart from the
    offload target "cpu"; on a GPU the parameters' devices are checked too."""
    gpu = torch.cuda.is_available()
    dev = torch.device("cuda:0" if gpu else "cpu:0")
    specs, _ = load_specs(long_spec(clips))  # 3 chunks chained through round trips
    settings = GenerationSettings.load(model)
    devices = dict.fromkeys(("text_encoder", "tokenizer", "dit"), dev)
    plain = Pipeline(build_sampler(model, settings), settings, devices).run(specs[0]).video
    pipe = Pipeline(build_sampler(model, settings), settings, devices, offload=tuple(devices))
    where: dict[str, str] = {}
    seen: list[tuple[str, dict]] = []
    components = pipe._components()
    for name, module in components.items():
        where[name] = "cpu"  # the constructor parked it

        def to(*args, _name=name, _to=module.to, **kw):
            target = torch.device(args[0] if args else kw["device"])
            where[_name] = "device" if target == dev else target.type
            return _to(*args, **kw)

        module.to = to

    def watch(obj, method, phase):
        original = getattr(obj, method)

        def call(*args, **kw):
            seen.append((phase, dict(where)))
            return original(*args, **kw)

        setattr(obj, method, call)

    watch(components["text_encoder"], "encode", "text")
    watch(components["tokenizer"], "encode", "tokenizer")
    watch(components["tokenizer"], "decode", "tokenizer")
    watch(components["dit"], "denoise", "dit")

    def parked() -> bool:
        on_cpu = all(v == "cpu" for v in where.values())
        if gpu:  # the parameters themselves
            on_cpu &= all(p.device.type == "cpu" for m in components.values() for p in m.parameters())
        return on_cpu

    job = pipe.prepare(specs[0])
    assert parked()
    pipe.denoise(job)
    assert parked()
    video = pipe.decode(job).video
    assert parked()
    assert np.array_equal(video, plain)
    assert {phase for phase, _ in seen} == {"text", "tokenizer", "dit"}
    for phase, state in seen:
        busy = {"text": {"text_encoder"}, "tokenizer": {"tokenizer"}, "dit": {"dit"}}[phase]
        if phase == "tokenizer" and state["dit"] == "device":
            busy = {"tokenizer", "dit"}  # a round trip inside the DiT phase
        assert {n for n, w in state.items() if w == "device"} == busy, (phase, state)


RECORD_PHASES = """
import os, sys
from modules import inference, pipeline

rank, write, run = os.environ["RANK"], inference.write_outputs, pipeline.Pipeline.run

def note(what, name):
    with open(sys.argv[1], "a") as f:
        f.write(f"{rank} {what} {name}\\n")

def write_outputs(job, *args, **kw):
    note("write", job.spec.name)
    return write(job, *args, **kw)

def run_spec(self, spec):
    note("run", spec.name)
    return run(self, spec)

inference.write_outputs, pipeline.Pipeline.run = write_outputs, run_spec
from tools.cli import main
main(sys.argv[2:])
"""


def test_context_parallel_infer_equals_one_process_and_writes_once(model, clips, tmp_path):
    """`infer --context-parallel 2` on 2 gloo processes: one group of 2 ranks, so both ranks run
    every spec (each with half of the latent frames; 3 frames: padded) and only the group's first
    rank writes. The videos equal the one-process run's up to 8-bit rounding of outputs that agree
    to 1e-5 (tests/test_context_parallel.py's network tolerance)."""
    spec = {"prompt": "a red square slides over a grey floor", "video_path": "input.mp4", "resolution": "32x48"}
    spec |= {"num_steps": 2, "guidance": 1, "edge": {"mask_path": "mask.mp4"}, "vis": {"control_weight": 0.5}}
    lines = [dict(spec, name=f"cp{n}", max_frames=n, seed=n) for n in (4, 3)]
    batch = _write(clips, "\n".join(json.dumps(s) for s in lines), "batch.jsonl")
    common = ["-i", str(batch), "--model", model, "--disable-guardrails", "--lossless", "true", "--device", "cpu"]
    assert run_infer(*common, "-o", tmp_path / "one") == 0
    log, port = tmp_path / "phases.log", str(free_port())
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
        env |= {"MASTER_PORT": port, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-c", RECORD_PHASES, str(log), "infer", *common, "-o", str(tmp_path / "cp")]
        cmd += ["--context-parallel", "2"]
        procs.append(subprocess.Popen(cmd, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True))
    errs = [p.communicate(timeout=PATIENCE_S)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errs
    assert "2 of 2 spec(s) generated" in errs[0]
    events = sorted(log.read_text().split("\n")[:-1])
    assert events == ["0 run cp3", "0 run cp4", "0 write cp3", "0 write cp4", "1 run cp3", "1 run cp4"]
    for name in ("cp4", "cp3"):
        assert json.loads((tmp_path / "cp" / f"{name}.json").read_text())["rank"] == 0
        one, two = (decode_video((tmp_path / d / f"{name}.mkv").read_bytes())[0].astype(int) for d in ("one", "cp"))
        assert one.shape == two.shape and np.abs(one - two).max() <= 1, name
    assert sorted(p.name for p in (tmp_path / "cp").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
