"""`vidistill infer`: generate videos from Transfer2.5-style JSON specs with a teacher or a student.

    vidistill infer -i SPEC.json|SPECS.jsonl -o OUT --model MODEL_DIR [--num-steps 4] ...

Everything is checked before any work (spec fields, files, prompts against the guardrails): an
invalid batch writes nothing and exits non-zero, unless `--keep-going` runs the valid specs and
reports the others at the end. Under torchrun the specs are split across ranks; every output is
named after its spec, so each file is written once, by one rank. With `--context-parallel N`
(as Transfer2.5's context parallel size) N consecutive ranks run each spec together, its tokens
split between them (modules/nets/context.py), and the first of them writes the outputs. A spec whose `<name>.json`
already records the same resolved spec and model is skipped (a rerun finishes a batch).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

COMPONENTS = ("text_encoder", "tokenizer", "dit")
MODES = ("transfer", "video2world", "text2world")


def infer(
    *,
    input: str,
    output_dir: str | None = None,
    model: str,
    mode: str = "transfer",
    num_steps: int | None = None,
    guidance: float | None = None,
    seed: int | None = None,
    resolution: str | None = None,
    reuse_latents: bool = False,
    offload: str | None = None,
    placement: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    keep_going: bool = False,
    disable_guardrails: bool = False,
    blocklist: str | None = None,
    safety_checker: list[str] | None = None,
    prompt_upsampler: str | None = None,
    annotator: dict[str, str] | None = None,
    tokenizer: str | None = None,
    tokenizer_path: str | None = None,
    tokenizer_options: dict | None = None,
    text_encoder: str | None = None,
    text_max_length: int | None = None,
    lossless: bool = False,
    overwrite: bool = False,
    context_parallel: int = 1,
    compile: bool | str = False,
) -> int:
    """Generate the videos of one spec (.json) or a batch (.jsonl, one spec per line).

    Args:
        input: spec file; paths inside are relative to it.
        output_dir: where outputs go (default: the spec's output_dir key, else ./outputs).
        model: Denoiser directory (export, consolidate or combine); its generation.json names
            the tokenizer, text encoder and sampler (a distilled student samples its t-list).
        mode: transfer (controls required), video2world (continue the input video's last
            frames; no controls) or text2world (prompt only; no video, no controls).
        num_steps: override every spec's num_steps (a student with another count than its
            t-list samples that many evenly spaced times).
        guidance: override every spec's guidance (teacher CFG, Cosmos's form).
        seed: override every spec's seed.
        resolution: override every spec's resolution: 480, 720 or HxW (small models).
        reuse_latents: chain long-video chunks on the previous chunk's latents instead of a
            decode/encode round trip.
        offload: comma-separated components kept on the CPU between their phases
            (text_encoder, tokenizer, dit).
        placement: two devices "A,B" (e.g. cuda:0,cuda:1): text encoder and tokenizer on A, the
            DiT on B, specs pipelined through them.
        device: auto (cuda:LOCAL_RANK when CUDA is there, else cpu), cpu or cuda:N.
        dtype: auto (bfloat16 on CUDA, float32 on CPU), bfloat16 or float32.
        keep_going: run the valid specs of a batch and report the invalid ones at the end.
        disable_guardrails: skip the prompt blocklist, safety checkers and face blurring.
        blocklist: prompt word-list file (default: the bundled list).
        safety_checker: "package.module:Class" safety models to run on prompts and videos.
        prompt_upsampler: "package.module:Class" that rewrites prompts before generation.
        annotator: per control key, a "package.module:Class" whose instance maps the input video
            (T, H, W, 3) uint8 to that control video, e.g. {"depth": "mypkg.depth:Annotator"}:
            such controls then need no control_path (none is bundled).
        tokenizer: override generation.json's tokenizer kind (pixel, cosmos-jit, wan2.1).
        tokenizer_path: local weights of that tokenizer.
        tokenizer_options: extra tokenizer arguments, e.g. {"spatial": 2}.
        text_encoder: override generation.json's text encoder (tiny or a local directory).
        text_max_length: override the prompt length in tokens.
        lossless: also write <name>.mkv (FFV1, lossless) for exact evaluation.
        overwrite: regenerate specs whose outputs already exist.
        context_parallel: ranks (of a torchrun) that split each spec's tokens between them;
            must divide the world size and the DiT's attention heads (16 for 2b). The specs are
            split across the world / N groups; every rank of a group runs the same spec with the
            same seed.
        compile: torch.compile the DiT's blocks (inductor) and, with the wan2.1 tokenizer, its
            decoder; a string names another torch.compile backend. The first spec pays the
            compilation (minutes at 720p), so it suits batches. On one H200 (`bench --mode
            generation`, docs/benchmarks.md) compiled blocks and a compiled channels-last decoder
            generate the 4-step student's 720p video in 16.9 s; all eager, 21.3 s.

    Returns the number of failed specs (the exit code is non-zero when any failed).
    """
    from modules.guardrails import Guardrails, load_hook
    from modules.pipeline import Pipeline, build_sampler, run_placed
    from modules.sampling import GenerationSettings
    from modules.spec import SpecError, load_specs

    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))

    # --- everything checked before any work -------------------------------------------------------
    settings = GenerationSettings.load(model) or GenerationSettings()
    if not (Path(model) / "config.json").is_file():
        raise FileNotFoundError(
            f"--model {model}: no config.json (expected a directory written by export, "
            "consolidate, combine or import-weights)"
        )
    if GenerationSettings.load(model) is None and tokenizer is None:
        raise ValueError(f"{model} has no generation.json: pass --tokenizer and --text_encoder")
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
    overrides = {
        k: v
        for k, v in dict(num_steps=num_steps, guidance=guidance, seed=seed, resolution=resolution).items()
        if v is not None
    }
    from modules.spec import SPEC_MODALITIES

    wrong = sorted(set(annotator or {}) - set(SPEC_MODALITIES))
    if wrong:
        raise ValueError(f"--annotator: unknown control key(s) {wrong}; choose from {', '.join(SPEC_MODALITIES)}")
    annotators = {k: load_hook(v) for k, v in (annotator or {}).items()}
    specs, failures = load_specs(
        Path(input).resolve(),
        keep_going=keep_going,
        require_control=mode == "transfer",
        overrides=overrides,
        annotated=tuple(annotators),
    )
    refused: dict[str, str] = {}  # spec name -> why (mode and guardrail checks)
    for spec in specs:
        if mode != "transfer" and spec.controls:
            refused[spec.name] = f"{mode} takes no control blocks"
        if mode == "text2world" and spec.video_path is not None:
            refused[spec.name] = "text2world takes no video_path"
        if mode == "video2world" and spec.video_path is None:
            refused[spec.name] = "video2world needs video_path"
    if disable_guardrails:
        guard = Guardrails.disabled()
    else:
        guard = Guardrails.default(blocklist_path=blocklist)
        guard.safety = [load_hook(h) for h in (safety_checker or [])]
        guard.upsampler = load_hook(prompt_upsampler) if prompt_upsampler else None
    for spec in specs:
        spec.prompt = guard.prepare_prompt(spec.prompt)
        reason = guard.check_prompt(spec.prompt)
        if reason:
            refused.setdefault(spec.name, reason)
    failures += [f"spec {s.name!r} ({s.source}): {refused[s.name]}" for s in specs if s.name in refused]
    total = len(specs) + len(failures)
    specs = [s for s in specs if s.name not in refused]
    if failures and not keep_going:
        raise SpecError(failures)
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
    if compile and settings.tokenizer["kind"] == "wan2.1":
        settings.tokenizer = dict(
            settings.tokenizer, options={**(settings.tokenizer.get("options") or {}), "compile": compile}
        )

    # --- devices and the model ----------------------------------------------------------------------
    local = int(os.environ.get("LOCAL_RANK", 0))
    if world > 1 and not torch.distributed.is_initialized():
        nccl = torch.cuda.is_available() and device != "cpu"
        if nccl:  # NCCL collectives (the end-of-batch report) run on this rank's own GPU
            torch.cuda.set_device(local)
        torch.distributed.init_process_group("nccl" if nccl else "gloo")
    if device == "auto":
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    if placement:
        side_a, side_b = (torch.device(d.strip()) for d in placement.split(","))
        devices = {"text_encoder": side_a, "tokenizer": side_a, "dit": side_b}
    else:
        devices = dict.fromkeys(COMPONENTS, torch.device(device))
    dt = {
        "auto": torch.bfloat16 if devices["dit"].type == "cuda" else torch.float32,
        "bfloat16": torch.bfloat16,
        "float32": torch.float32,
    }[dtype]
    generator = build_sampler(model, settings)
    if compile:
        from modules.parallel import set_compile

        set_compile(generator.denoiser, True, "inductor" if compile is True else compile)
    writer = True  # this rank writes its specs' outputs (the first rank of a context-parallel group)
    share, shares = rank, world  # this rank's share of the specs
    if context_parallel > 1:
        from modules.parallel import context_group, context_mesh, data_parallel_rank

        mesh = context_mesh(devices["dit"].type, world // context_parallel, context_parallel)
        generator.denoiser.set_context_parallel(context_group(mesh))
        writer = mesh["context_parallel"].get_local_rank() == 0
        share, shares = data_parallel_rank(mesh)  # specs are split across the groups
    pipe = Pipeline(
        generator,
        settings,
        devices,
        offloaded,
        reuse_latents,
        mode,
        dt,
        progress=len(specs) == 1,
        annotators=annotators,
    )

    out_root = Path(output_dir) if output_dir else None
    mine = specs[share::shares]
    errors: list[str] = []
    done = 0

    def out_dir(spec) -> Path:
        return out_root or spec.output_dir or Path("outputs")

    # encoding (WebM above all) runs beside the next spec's generation, at most 2 videos behind
    from concurrent.futures import ThreadPoolExecutor

    pool, pending = ThreadPoolExecutor(max_workers=2), []

    def written(future, spec) -> None:
        nonlocal done
        try:
            reason = future.result()
        except Exception as err:  # noqa: BLE001 - reported per spec
            reason = f"writing outputs failed: {type(err).__name__}: {err}"
        if reason:
            errors.append(f"spec {spec.name!r} ({spec.source}): {reason}")
        else:
            done += 1

    def finish(job) -> None:
        if not writer:
            return
        pending.append((pool.submit(write_outputs, job, out_dir(job.spec), model, mode, guard, lossless), job.spec))
        while len(pending) > 2:
            written(*pending.pop(0))

    def fail(spec, err) -> None:
        if os.environ.get("VIDISTILL_DEBUG"):
            raise err
        if not writer:  # the group's writer reports it
            return
        errors.append(f"spec {spec.name!r} ({spec.source}): {type(err).__name__}: {err}")

    todo = [s for s in mine if overwrite or not finished(s, out_dir(s), model, mode)]
    skipped = len(mine) - len(todo)
    if skipped:
        print(f"rank {rank}: {skipped} spec(s) already generated (pass --overwrite to redo)", file=sys.stderr)
    start = time.perf_counter()
    if placement:
        run_placed(pipe, todo, finish, fail)
    else:
        from tqdm import tqdm

        for spec in tqdm(
            todo,
            desc=f"infer (rank {rank})" if world > 1 else "infer",
            unit="spec",
            disable=len(todo) < 2,
            position=rank,
        ):
            try:
                finish(pipe.run(spec))
            except Exception as err:  # noqa: BLE001 - reported per spec
                fail(spec, err)

    for item in pending:
        written(*item)
    pool.shutdown()
    elapsed = time.perf_counter() - start  # the batch, without loading the model
    if world > 1:
        gathered: list = [None] * world
        torch.distributed.all_gather_object(gathered, (errors, done, elapsed))
        errors = [e for part in gathered for e in part[0]]
        done, elapsed = sum(p[1] for p in gathered), max(p[2] for p in gathered)
    errors = failures + errors
    if rank == 0:
        for e in errors:
            print(f"failed: {e}", file=sys.stderr)
        rate = f" ({done / elapsed * 60:.2f} videos/min over {elapsed:.1f} s)" if done and elapsed > 0 else ""
        print(f"infer: {total - len(errors)} of {total} spec(s) generated{rate}", file=sys.stderr)
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if errors:
        sys.exit(1)
    return 0


def run_info(spec, model: str, mode: str) -> dict:
    return {"spec": spec.to_json(), "model": str(Path(model).resolve()), "mode": mode}


def finished(spec, out: Path, model: str, mode: str) -> bool:
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


def write_outputs(job, out: Path, model: str, mode: str, guard, lossless: bool) -> str | None:
    """The video (mp4, WebM, optionally lossless mkv), prompt, controls used, an optional
    side-by-side, and `<name>.json` (resolved spec, sampler, NFE, times) last. Returns a refusal
    reason from the video safety checks, else None."""
    import cv2

    from datamodules.codec import write_video
    from modules.pipeline import nfe

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
    name, fps = spec.name, inputs.fps
    files = [f"{name}.mp4", f"{name}.webm"] + ([f"{name}.mkv"] if lossless else [])
    for f in files:
        write_video(out / f, video, fps, "vp8" if f.endswith(".webm") else None)
    (out / f"{name}.txt").write_text(spec.prompt + "\n")
    files.append(f"{name}.txt")
    for m, ctrl in inputs.controls.items():
        write_video(out / f"{name}_control_{m}.mp4", ctrl[: len(job.video)], fps)
        files.append(f"{name}_control_{m}.mp4")
    panels = []
    if spec.show_input and inputs.video is not None:
        panels.append(inputs.video)
    if spec.show_control_condition:
        panels += list(inputs.controls.values())
    if panels:
        n = len(job.video)
        side = np.concatenate([np.asarray(p[:n]) for p in panels] + [guard.postprocess(job.video)], axis=2)
        for f in (f"{name}_compare.mp4", f"{name}_compare.webm"):
            write_video(out / f, side, fps, "vp8" if f.endswith(".webm") else None)
            files.append(f)
    job.seconds["write"] = time.perf_counter() - t0
    chunks = len(job.plan.starts)
    info = dict(
        run_info(spec, model, mode),
        sampler=asdict(job.sampler),
        nfe=nfe(job.sampler) * chunks,
        chunks=chunks,
        frames=len(video),
        fps=fps,
        height=inputs.height,
        width=inputs.width,
        seconds=dict(job.seconds, generate=sum(v for k, v in job.seconds.items() if k != "write")),
        guardrails=guard.enabled,
        rank=int(os.environ.get("RANK", 0)),
        outputs=files,
    )
    tmp = out / f".{name}.json.tmp"
    tmp.write_text(json.dumps(info, indent=2))
    tmp.replace(out / f"{name}.json")
    return None
