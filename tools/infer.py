"""`vidistill infer`: generate videos from Transfer2.5-style JSON specs with a teacher or a student.

    vidistill infer -i SPEC.json|SPECS.jsonl -o OUT --model MODEL_DIR [--num-steps 4] ...

Everything is checked before any work (flags and devices, the model's config, spec fields, files,
that every video decodes and every control has a branch in the model, prompts against the
guardrails): an invalid batch writes nothing and exits non-zero, unless `--keep-going` runs the
valid specs and reports the others at the end. Under torchrun the specs are split across ranks;
every output is named after its spec, so each file is written once, by one rank. With
`--context-parallel N` (as Transfer2.5's context parallel size) N consecutive ranks run each spec
together, its tokens split between them (modules/nets/context.py), and the first of them writes
the outputs. A spec whose `<name>.json` already records the same resolved spec and model is
skipped (a rerun finishes a batch).

This file is the command line; the phases it calls are modules/inference.py's.
"""

from __future__ import annotations

import sys


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

    Returns 0 when every spec was generated (or had been, see above); when any failed, they are
    listed on stderr and the process exits with status 1 instead of returning.
    """
    from modules import inference

    ranks = inference.Ranks.from_env()
    offloaded = inference.check_flags(mode, offload, placement, context_parallel, compile, ranks.world, device)
    settings = inference.resolve_settings(
        model,
        tokenizer=tokenizer,
        tokenizer_path=tokenizer_path,
        tokenizer_options=tokenizer_options,
        text_encoder=text_encoder,
        text_max_length=text_max_length,
        compile=compile,
    )
    annotators = inference.load_annotators(annotator)
    guard = inference.make_guardrails(disable_guardrails, blocklist, safety_checker, prompt_upsampler)
    overrides = dict(num_steps=num_steps, guidance=guidance, seed=seed, resolution=resolution)
    specs, failures, total = inference.checked_specs(
        input, mode, guard, keep_going=keep_going, overrides=overrides, annotators=annotators, model=model
    )
    inference.check_outputs(output_dir, specs)  # every rank, so that all of them stop

    devices, dt = inference.place(device, placement, dtype, ranks)
    pipe, ranks = inference.build_pipeline(
        model,
        settings,
        devices,
        dt,
        ranks,
        offload=offloaded,
        reuse_latents=reuse_latents,
        mode=mode,
        compile=compile,
        context_parallel=context_parallel,
        progress=len(specs) == 1,
        annotators=annotators,
    )
    outputs = inference.Outputs(output_dir, model, mode, guard, lossless, ranks.writes)
    elapsed = inference.run_batch(pipe, specs, outputs, ranks, overwrite=overwrite, placement=placement)
    if inference.report(outputs, elapsed, failures, total, ranks):
        sys.exit(1)
    return 0
