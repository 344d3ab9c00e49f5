"""A batch of inference specs, from checked flags to written outputs (what `vidistill infer` runs).

tools/infer.py parses the command line and calls these phases in order:

    check_flags       mode, offload, placement, context parallel, compile, devices: no file read yet
    resolve_settings  the model's generation.json, overridden by the tokenizer and text flags
    load_annotators   the control annotator hooks
    make_guardrails   the prompt blocklist and safety checkers (or none), the prompt upsampler
    checked_specs     every spec read and checked, refused by mode, the model's control branches,
                      videos that do not decode or the guardrails; an invalid batch raises
                      SpecError before any work, unless keep_going
    place             the process group of a torchrun, the device of every component, the dtype
    build_pipeline    the Sampler on its devices, compiled or context-parallel; this rank's share
    run_batch         this rank's unfinished specs through the Pipeline (modules/pipeline.py),
                      their outputs written by `Outputs` on background threads
    report            every rank's failures gathered and printed; the process group closed

Each output is named after its spec, so one rank writes it; a spec whose `<name>.json` records the
same resolved spec, model and mode is finished (`finished`) and not run again.
"""

from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from datamodules.files import check_writable, written

from .denoiser import Denoiser
from .dtypes import to_dtype
from .guardrails import Guardrails, load_hook
from .pipeline import Pipeline, Prepared, build_sampler, nfe, run_placed
from .sampling import GenerationSettings
from .spec import MODALITY_NAMES, SPEC_MODALITIES, Spec, SpecError, load_specs

COMPONENTS = ("text_encoder", "tokenizer", "dit")
MODES = ("transfer", "video2world", "text2world")
WRITE_BEHIND = 2
"""Videos the background writer may lag behind generation (each holds a decoded video)."""


@dataclass(frozen=True)
class Ranks:
    """This process's place in a torchrun (one process: rank 0 of 1) and its share of the specs."""

    rank: int = 0
    world: int = 1
    local: int = 0
    writes: bool = True
    """This rank writes its specs' outputs (in a context-parallel group only the first does)."""
    share: int = 0
    shares: int = 1
    """This rank runs specs[share::shares]."""

    @classmethod
    def from_env(cls) -> Ranks:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        return cls(rank, world, int(os.environ.get("LOCAL_RANK", 0)), True, rank, world)


def check_flags(
    mode: str,
    offload: str | None,
    placement: str | None,
    context_parallel: int,
    compile: bool | str,
    world: int,
    device: str = "auto",
) -> tuple[str, ...]:
    """Refuse flags that do not go together or devices this machine lacks; returns the offloaded
    components."""
    check_device(device, "--device")
    if placement is not None:
        sides = [d.strip() for d in placement.split(",")]
        if len(sides) != 2:
            raise ValueError(f"--placement {placement}: give two devices, A,B (e.g. cuda:0,cuda:1)")
        for side in sides:
            check_device(side, "--placement")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    offloaded = tuple(c.strip() for c in offload.split(",") if c.strip()) if offload else ()
    unknown = set(offloaded) - set(COMPONENTS)
    if unknown:
        raise ValueError(f"--offload: unknown component(s) {sorted(unknown)}; choose from {', '.join(COMPONENTS)}")
    if placement and offloaded:
        raise ValueError("--placement and --offload exclude each other (placement keeps every component on its GPU)")
    if context_parallel < 1 or world % context_parallel:
        raise ValueError(
            f"--context-parallel {context_parallel} must divide the number of processes ({world}; "
            "start them with torchrun --nproc_per_node)"
        )
    if placement and context_parallel > 1:
        raise ValueError("--placement and --context-parallel exclude each other")
    if compile and context_parallel > 1:
        raise ValueError(
            "--compile has not been run with --context-parallel (the all-to-alls sit inside "
            "the compiled blocks); use one of them"
        )
    return offloaded


def check_device(name: str, flag: str) -> None:
    """`name` (auto, cpu, cuda, cuda:N) is a device this machine has."""
    if name == "auto":
        return
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"{flag} {name}: not a device ({err})") from None
    if device.type != "cuda":
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not count:
        raise ValueError(
            f"{flag} {name}: this machine has no CUDA device (torch.cuda.is_available() is False); use --device cpu"
        )
    if device.index is not None and device.index >= count:
        raise ValueError(f"{flag} {name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")


def resolve_settings(
    model: str,
    *,
    tokenizer: str | None = None,
    tokenizer_path: str | None = None,
    tokenizer_options: dict | None = None,
    text_encoder: str | None = None,
    text_max_length: int | None = None,
    compile: bool | str = False,
) -> GenerationSettings:
    """The model's generation.json with the flags' tokenizer and text encoder in place of its own.
    A model without generation.json needs the tokenizer named; `compile` also compiles the Wan2.1
    tokenizer's decoder."""
    if not (Path(model) / "config.json").is_file():
        raise FileNotFoundError(
            f"--model {model}: no config.json (expected a directory written by export, "
            "consolidate, combine or import-weights)"
        )
    saved = GenerationSettings.load(model)
    if saved is None and tokenizer is None:
        raise ValueError(f"{model} has no generation.json: pass --tokenizer and --text_encoder")
    settings = saved or GenerationSettings()
    if tokenizer:
        settings.tokenizer = {"kind": tokenizer, "path": tokenizer_path, "options": tokenizer_options or {}}
    elif tokenizer_options is not None or tokenizer_path is not None:
        settings.tokenizer = dict(
            settings.tokenizer,
            **({"options": tokenizer_options} if tokenizer_options is not None else {}),
            **({"path": tokenizer_path} if tokenizer_path is not None else {}),
        )
    if text_encoder:
        settings.text = dict(settings.text, encoder=text_encoder)
    if text_max_length:
        settings.text = dict(settings.text, max_length=text_max_length)
    if compile and settings.tokenizer["kind"] == "wan2.1":
        settings.tokenizer = dict(
            settings.tokenizer, options={**(settings.tokenizer.get("options") or {}), "compile": compile}
        )
    return settings


def load_annotators(annotator: dict[str, str] | None) -> dict:
    """Spec control key -> the loaded "package.module:Class" hook computing that control."""
    wrong = sorted(set(annotator or {}) - set(SPEC_MODALITIES))
    if wrong:
        raise ValueError(f"--annotator: unknown control key(s) {wrong}; choose from {', '.join(SPEC_MODALITIES)}")
    return {k: load_hook(v) for k, v in (annotator or {}).items()}


def make_guardrails(
    disable: bool,
    blocklist: str | None = None,
    safety_checker: list[str] | None = None,
    prompt_upsampler: str | None = None,
) -> Guardrails:
    """The bundled (or `blocklist`) prompt word list plus the safety hooks given, or no checks
    (`disable`); the prompt upsampler either way, since it rewrites prompts and checks nothing."""
    upsampler = load_hook(prompt_upsampler) if prompt_upsampler else None
    if disable:
        return Guardrails.disabled(upsampler)
    guard = Guardrails.default(blocklist_path=blocklist)
    guard.safety = [load_hook(h) for h in (safety_checker or [])]
    guard.upsampler = upsampler
    return guard


def checked_specs(
    input: str | Path,
    mode: str,
    guard: Guardrails,
    *,
    keep_going: bool = False,
    overrides: dict | None = None,
    annotators: dict | None = None,
    model: str | Path | None = None,
) -> tuple[list[Spec], list[str], int]:
    """The batch's runnable specs, the failure lines of the others and the batch's spec count.

    `overrides` (flag -> value, None: not given) replace those keys in every spec. Prompts are
    upsampled and checked here, so a refused prompt fails the batch before any work; so does a
    control block `model` (its config.json) has no branch for and a video field whose file does
    not decode. Without `keep_going` any failure raises SpecError listing them all."""
    specs, failures = load_specs(
        Path(input).resolve(),
        keep_going=keep_going,
        require_control=mode == "transfer",
        overrides={k: v for k, v in (overrides or {}).items() if v is not None},
        annotated=tuple(annotators or {}),
    )
    total = len(specs) + len(failures)  # each spec once, whether it is refused below or not
    refused = refusals(specs, mode, guard)
    branches = Denoiser.config_from(model).modalities if model is not None else None
    for more in (missing_branches(specs, branches) if branches is not None else {}, undecodable(specs)):
        for name, reason in more.items():
            refused.setdefault(name, reason)
    failures += [f"spec {s.name!r} ({s.source}): {refused[s.name]}" for s in specs if s.name in refused]
    specs = [s for s in specs if s.name not in refused]
    if failures and not keep_going:
        raise SpecError(failures)
    return specs, failures, total


def refusals(specs: list[Spec], mode: str, guard: Guardrails) -> dict[str, str]:
    """Spec name -> why it cannot run: inputs the mode does not take, or a refused prompt (the
    user's prompt and the upsampled one that replaces it in place are both checked). A spec with
    both reports its mode problem."""
    refused: dict[str, str] = {}
    for spec in specs:
        if mode != "transfer" and spec.controls:
            refused[spec.name] = f"{mode} takes no control blocks"
        if mode == "text2world" and spec.video_path is not None:
            refused[spec.name] = "text2world takes no video_path"
        if mode == "video2world" and spec.video_path is None:
            refused[spec.name] = "video2world needs video_path"
    for spec in specs:
        spec.prompt, reason = guard.prompt(spec.prompt)  # the user's prompt and the upsampled one
        if reason:
            refused.setdefault(spec.name, reason)
    return refused


def missing_branches(specs: list[Spec], branches: list[str]) -> dict[str, str]:
    """Spec name -> its first control block the model has no branch for (the network's name of a
    spec key: vis is the blur branch)."""
    missing: dict[str, str] = {}
    for spec in specs:
        for key in spec.controls:
            if MODALITY_NAMES[key] not in branches and spec.name not in missing:
                has = ", ".join(branches) or "none"
                missing[spec.name] = (
                    f"field {key!r}: the model has no {MODALITY_NAMES[key]} control branch (it has: {has})"
                )
    return missing


def undecodable(specs: list[Spec]) -> dict[str, str]:
    """Spec name -> its first video field (video_path, control_path, mask_path) whose file does
    not decode: its first frame is decoded here, once per file, so generation never meets it."""
    from datamodules.codec import VideoDecodeError, decode_video

    errors: dict[Path, str | None] = {}
    bad: dict[str, str] = {}
    for spec in specs:
        fields = [("video_path", spec.video_path)] + [
            (f"{key}.{f}", getattr(c, f)) for key, c in spec.controls.items() for f in ("control_path", "mask_path")
        ]
        for field, path in fields:
            if path is None or spec.name in bad:
                continue
            if path not in errors:
                try:
                    decode_video(path.read_bytes(), [0])
                    errors[path] = None
                except (VideoDecodeError, OSError) as err:
                    errors[path] = str(err)
            if errors[path] is not None:
                bad[spec.name] = f"field {field!r}: {path} is not a decodable video ({errors[path]})"
    return bad


def place(device: str, placement: str | None, dtype: str, ranks: Ranks) -> tuple[dict[str, torch.device], torch.dtype]:
    """Join the torchrun's process group (NCCL on a GPU, else gloo) and pick every component's
    device and the DiT's compute dtype (auto: bfloat16 on CUDA, float32 on the CPU)."""
    if ranks.world > 1 and not torch.distributed.is_initialized():
        nccl = torch.cuda.is_available() and device != "cpu"
        if nccl:  # NCCL collectives (the end-of-batch report) run on this rank's own GPU
            torch.cuda.set_device(ranks.local)
        torch.distributed.init_process_group("nccl" if nccl else "gloo")
    if device == "auto":
        device = f"cuda:{ranks.local}" if torch.cuda.is_available() else "cpu"
    if placement:
        side_a, side_b = (torch.device(d.strip()) for d in placement.split(","))
        devices = {"text_encoder": side_a, "tokenizer": side_a, "dit": side_b}
    else:
        devices = dict.fromkeys(COMPONENTS, torch.device(device))
    if dtype == "auto":
        return devices, torch.bfloat16 if devices["dit"].type == "cuda" else torch.float32
    return devices, to_dtype(dtype, "--dtype")


def build_pipeline(
    model: str,
    settings: GenerationSettings,
    devices: dict[str, torch.device],
    dtype: torch.dtype,
    ranks: Ranks,
    *,
    offload: tuple[str, ...] = (),
    reuse_latents: bool = False,
    mode: str = "transfer",
    compile: bool | str = False,
    context_parallel: int = 1,
    progress: bool = False,
    annotators: dict | None = None,
) -> tuple[Pipeline, Ranks]:
    """The model's Pipeline, and `ranks` with this rank's share of the specs: with
    `context_parallel` N, the N ranks of a group run the same specs (the specs are split across
    the groups) and the group's first rank writes them."""
    sampler = build_sampler(model, settings)
    if compile:
        from .parallel import set_compile

        set_compile(sampler.denoiser, True, "inductor" if compile is True else compile)
    if context_parallel > 1:
        from .parallel import context_group, context_mesh, data_parallel_rank

        mesh = context_mesh(devices["dit"].type, ranks.world // context_parallel, context_parallel)
        sampler.denoiser.set_context_parallel(context_group(mesh))
        share, shares = data_parallel_rank(mesh)
        ranks = replace(ranks, writes=mesh["context_parallel"].get_local_rank() == 0, share=share, shares=shares)
    pipe = Pipeline(
        sampler, settings, devices, offload, reuse_latents, mode, dtype, progress=progress, annotators=annotators
    )
    return pipe, ranks


def output_dir(out_root: str | None, spec: Spec) -> Path:
    """Where a spec's outputs go: `-o`, else the spec's own output_dir, else ./outputs."""
    return Path(out_root) if out_root else spec.output_dir or Path("outputs")


def check_outputs(out_root: str | None, specs: list[Spec]) -> None:
    """Every output folder of the batch takes a file, before anything is generated (not after
    minutes of generation, with every write failing)."""
    for folder in sorted({output_dir(out_root, s) for s in specs}):
        check_writable(folder, "output folder")


class Outputs:
    """Writes each generated spec's outputs on background threads, so that encoding (WebM above
    all) runs beside the next spec's generation, at most WRITE_BEHIND videos behind; collects the
    per-spec failures. A rank that does not write (`writes` False) neither writes nor reports."""

    def __init__(
        self, out_root: str | None, model: str, mode: str, guard: Guardrails, lossless: bool, writes: bool = True
    ):
        self.out_root = Path(out_root) if out_root else None
        self.model, self.mode, self.guard, self.lossless, self.writes = model, mode, guard, lossless, writes
        self.pool = ThreadPoolExecutor(max_workers=WRITE_BEHIND)
        self.pending: list[tuple[Future, Spec]] = []
        self.errors: list[str] = []
        self.done = 0

    def out_dir(self, spec: Spec) -> Path:
        return output_dir(self.out_root and str(self.out_root), spec)

    def finished(self, spec: Spec) -> bool:
        return finished(spec, self.out_dir(spec), self.model, self.mode)

    def finish(self, job: Prepared) -> None:
        """Queue a generated spec's outputs; wait for the oldest when too many are queued."""
        if not self.writes:
            return
        future = self.pool.submit(
            write_outputs, job, self.out_dir(job.spec), self.model, self.mode, self.guard, self.lossless
        )
        self.pending.append((future, job.spec))
        while len(self.pending) > WRITE_BEHIND:
            self._written(*self.pending.pop(0))

    def fail(self, spec: Spec, err: Exception) -> None:
        if os.environ.get("VIDISTILL_DEBUG"):
            raise err
        if self.writes:  # else the group's writer reports it
            self.errors.append(f"spec {spec.name!r} ({spec.source}): {type(err).__name__}: {err}")

    def close(self) -> None:
        """Wait for every queued output."""
        for item in self.pending:
            self._written(*item)
        self.pending = []
        self.pool.shutdown()

    def _written(self, future: Future, spec: Spec) -> None:
        try:
            reason = future.result()
        except Exception as err:  # noqa: BLE001 - reported per spec
            reason = f"writing outputs failed: {type(err).__name__}: {err}"
        if reason:
            self.errors.append(f"spec {spec.name!r} ({spec.source}): {reason}")
        else:
            self.done += 1


def run_batch(
    pipe: Pipeline,
    specs: list[Spec],
    outputs: Outputs,
    ranks: Ranks,
    *,
    overwrite: bool = False,
    placement: str | None = None,
) -> float:
    """Generate this rank's share of `specs` (skipping finished ones unless `overwrite`), on two
    devices in a software pipeline with `placement`; returns the seconds the batch took, its
    outputs written (`outputs` holds the failures)."""
    from tqdm import tqdm

    mine = specs[ranks.share :: ranks.shares]
    todo = [s for s in mine if overwrite or not outputs.finished(s)]
    skipped = len(mine) - len(todo)
    if skipped:
        print(f"rank {ranks.rank}: {skipped} spec(s) already generated (pass --overwrite to redo)", file=sys.stderr)
    start = time.perf_counter()
    if placement:
        run_placed(pipe, todo, outputs.finish, outputs.fail)
    else:
        for spec in tqdm(
            todo,
            desc=f"infer (rank {ranks.rank})" if ranks.world > 1 else "infer",
            unit="spec",
            disable=len(todo) < 2,
            position=ranks.rank,
        ):
            try:
                outputs.finish(pipe.run(spec))
            except Exception as err:  # noqa: BLE001 - reported per spec
                outputs.fail(spec, err)
    outputs.close()
    return time.perf_counter() - start


def report(outputs: Outputs, elapsed: float, failures: list[str], total: int, ranks: Ranks) -> list[str]:
    """Every failure of the batch (the spec checks' and every rank's), printed by rank 0 with the
    batch's throughput; closes the process group. Returns the failure lines."""
    errors, done = outputs.errors, outputs.done
    if ranks.world > 1:
        gathered: list = [None] * ranks.world
        torch.distributed.all_gather_object(gathered, (errors, done, elapsed))
        errors = [e for part in gathered for e in part[0]]
        done, elapsed = sum(p[1] for p in gathered), max(p[2] for p in gathered)
    errors = failures + errors
    if ranks.rank == 0:
        for e in errors:
            print(f"failed: {e}", file=sys.stderr)
        rate = f" ({done / elapsed * 60:.2f} videos/min over {elapsed:.1f} s)" if done and elapsed > 0 else ""
        print(f"infer: {total - len(errors)} of {total} spec(s) generated{rate}", file=sys.stderr)
    if ranks.world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return errors


# --- one spec's outputs ---------------------------------------------------------------------------


def run_info(spec: Spec, model: str, mode: str) -> dict:
    """What makes an output: the resolved spec, the model directory and the mode."""
    return {"spec": spec.to_json(), "model": str(Path(model).resolve()), "mode": mode}


def finished(spec: Spec, out: Path, model: str, mode: str) -> bool:
    """Whether `<name>.json` records this very spec, model and mode (its outputs are complete:
    the JSON is written last)."""
    file = out / f"{spec.name}.json"
    if not file.is_file():
        return False
    try:
        info = json.loads(file.read_text())
    except json.JSONDecodeError:
        return False
    return all(info.get(k) == v for k, v in run_info(spec, model, mode).items())


def write_outputs(job: Prepared, out: Path, model: str, mode: str, guard: Guardrails, lossless: bool) -> str | None:
    """The video (mp4, WebM, optionally lossless mkv), prompt, controls used, an optional
    side-by-side, and `<name>.json` (resolved spec, sampler, NFE, times) last. Returns a refusal
    reason from the video safety checks, else None."""
    import cv2

    spec, inputs = job.spec, job.inputs
    t0 = time.perf_counter()
    video = guard.postprocess(job.video)
    reason = guard.check_video(video)
    if reason:
        return reason
    size = (inputs.height, inputs.width)
    if spec.keep_input_resolution and inputs.source_size and tuple(inputs.source_size) != size:
        h, w = (v - v % 2 for v in inputs.source_size)
        video = np.stack([cv2.resize(f, (w, h), interpolation=cv2.INTER_AREA) for f in video])
    out.mkdir(parents=True, exist_ok=True)
    name = spec.name
    with ExitStack() as stack:
        # every file under a temporary name, renamed together once all are written, <name>.json
        # last (entered first): a failed or killed write leaves no half-written output behind
        json_tmp = stack.enter_context(written(out / f"{name}.json"))
        files = _write_videos(stack, out, job, video, lossless, guard)
        job.seconds["write"] = time.perf_counter() - t0
        info = dict(run_info(spec, model, mode), **_details(job, video), guardrails=guard.enabled, outputs=files)
        json_tmp.write_text(json.dumps(info, indent=2))
    return None


def _write_videos(stack: ExitStack, out: Path, job: Prepared, video: np.ndarray, lossless: bool, guard) -> list[str]:
    """The video, prompt, controls and side-by-side, each to a temporary name held by `stack`;
    returns their final names."""
    from datamodules.codec import write_video

    spec, inputs, fps, name = job.spec, job.inputs, job.inputs.fps, job.spec.name
    files: list[str] = []

    def tmp(file: str) -> Path:
        files.append(file)
        return stack.enter_context(written(out / file))

    for f in [f"{name}.mp4", f"{name}.webm"] + ([f"{name}.mkv"] if lossless else []):
        write_video(tmp(f), video, fps, "vp8" if f.endswith(".webm") else None)
    tmp(f"{name}.txt").write_text(spec.prompt + "\n")
    for m, ctrl in inputs.controls.items():
        write_video(tmp(f"{name}_control_{m}.mp4"), ctrl[: len(job.video)], fps)
    panels = []
    if spec.show_input and inputs.video is not None:
        panels.append(inputs.video)
    if spec.show_control_condition:
        panels += list(inputs.controls.values())
    if panels:
        n = len(job.video)
        side = np.concatenate([np.asarray(p[:n]) for p in panels] + [guard.postprocess(job.video)], axis=2)
        for f in (f"{name}_compare.mp4", f"{name}_compare.webm"):
            write_video(tmp(f), side, fps, "vp8" if f.endswith(".webm") else None)
    return files


def _details(job: Prepared, video: np.ndarray) -> dict:
    """What the JSON records besides the spec: sampler, NFE, sizes, per-phase seconds."""
    chunks = len(job.plan.starts)
    return dict(
        sampler=asdict(job.sampler),
        nfe=nfe(job.sampler) * chunks,
        chunks=chunks,
        frames=len(video),
        fps=job.inputs.fps,
        height=job.inputs.height,
        width=job.inputs.width,
        seconds=dict(job.seconds, generate=sum(v for k, v in job.seconds.items() if k != "write")),
        rank=int(os.environ.get("RANK", 0)),
    )
