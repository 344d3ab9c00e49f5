"""`vidistill bench`: step time, peak memory and MFU of our network against a named peer, and the
other measurements of docs/benchmarks.md, one module per mode (net, data, generation, dmd2,
scale); what they share is in tools/bench/common.py. This module holds only the command line.

Kept apart from every training and inference path so measuring never changes them.
"""

from __future__ import annotations

from modules.nets import PEAK_TFLOPS
from tools.bench.common import Options

MODES = ("net", "data", "generation", "dmd2", "scale")
# --shapes when not given: the 720p training step for scale, the 480p DMD2 turns for dmd2
DEFAULT_SHAPES = {"scale": "720p_93f", "dmd2": "480p_93f"}


def bench(
    mode: str = "net",
    preset: str = "2b",
    shapes: str | None = None,
    peer: str | None = None,
    peer_compile_backend: str = "inductor",
    steps: int = 2,
    device: str = "cuda",
    dtype: str = "bfloat16",
    checkpointing: str | bool = "full",
    attention_backend: str = "auto",
    compile: bool = False,
    infer: bool = True,
    variants: str | None = None,
    profile: str | None = None,
    peak_tflops: float = PEAK_TFLOPS,
    shards: str | None = None,
    resolutions: str = "480p,720p",
    num_frames: int = 93,
    seconds: float = 20.0,
    edge: str = "both",
    workers: int = 1,
    teacher_steps: int = 35,
    guidance: float = 3.0,
    student_steps: int = 4,
    decode: str = "wan2.1",
    decode_channels_last: bool = False,
    decode_compile: bool = False,
    modalities: str = "edge",
    student_trainable: str = "all",
    parts: str = "control,cp_train,cp_infer,dmd2",
    context_parallel: int = 2,
    dmd2_shapes: str = "480p_93f",
    dmd2_checkpointing: str = "full",
    sparse: str | None = None,
) -> list[dict]:
    """Time a control-training step and an inference forward of a preset, optionally against a peer.

    The training step runs base + control forward, an MSE loss, backward and AdamW on the control
    branch (base frozen); the inference forward is base + control without gradients.

    `--mode data` instead measures data loading: decoded clips per second per worker
    (tools/bench/data.py), with and without on-the-fly edge extraction.

    `--mode generation` times end-to-end sampling, teacher (CFG, many steps) against student
    (few steps), plus decoding (tools/bench/generation.py).

    `--mode dmd2` times, in one process with the same inputs, the control-training step above
    (ours), one KD warmup step of the KD stage's own code, one DMD2 student turn and one critic
    turn of the DMD2 stage's own code at the full backward simulation, and each one's ratio to
    the control step (tools/bench/dmd2.py).

    `--mode scale` (under torchrun, 2 or more processes) measures data parallelism (FSDP2) and
    context parallelism against one GPU in the same run: control-training throughput, DMD2
    turns, a context-parallel training step and inference per step (tools/bench/scale.py).

    Args:
        mode: net (the network against its peer), data (clip decoding throughput), generation
            (teacher vs student sampling time), dmd2 (a KD step and the DMD2 turns against the
            control step) or scale (several GPUs against one).
        preset: network preset (tiny, small, 2b, 14b); the text projection is left out, as in the peer.
        shapes: comma-separated named shapes (480p_93f, 720p_93f) or latent grids TxHxW; none:
            480p_93f for dmd2, else 480p_93f,720p_93f.
        peer: "diffusers" to also run diffusers' Cosmos transformer + controlnet of the same
            configuration, first eager, then with every transformer and control block compiled;
            the speed-up lines are against the compiled peer, with the eager peer's beside them.
        peer_compile_backend: torch.compile backend of the compiled peer: inductor (aot_eager or
            eager only for CPU tests, where inductor's C++ code generation takes minutes).
        steps: timed runs per measurement (median), after one warm-up.
        device: cuda or cpu (cpu only for smoke tests).
        dtype: parameter and activation dtype (bfloat16 or float32).
        checkpointing: ours: none, full, selective, attention (keep only attention outputs),
            partial:N (full on the first N blocks in execution order, control blocks first, none
            on the rest) or partial:N:REST (modules.nets.dit.checkpoint_plan); true/false mean
            full/none. The peer keeps its reference setting, full checkpointing of every block,
            unless this is none/false. dmd2 mode: the control step's network, the KD student and the
            blocks of all DMD2 networks (student, teacher, fake score; the GAN head has none).
        attention_backend: SDPA backend for ours (auto, flash, cudnn, efficient, math).
        compile: torch.compile each of our blocks (inductor), as `sharding.compile` does in training;
            the warm-up run pays the compilation. dmd2 mode: every network's blocks.
        infer: also time the inference forward (ours and the peer); false halves a training-only comparison.
        variants: further configurations of ours measured after the first, in the same process and
            against the same peer: `key=value,...` separated by `;`, keys checkpointing, compile,
            attention_backend and infer (false: skip the inference forward), each starting from
            the options above, e.g. "attention_backend=flash;checkpointing=partial:20,infer=false";
            also shapes (`+`-separated), steps and profile (true/false) per variant. The peer runs first.
            dmd2 mode: keys checkpointing, compile, attention_backend, shapes and steps, each
            applied to the control step, the KD step and both turns.
        profile: a folder: after each measurement, profile one more training step of its last
            shape and write the top kernels by device time there (and to stdout).
        peak_tflops: the GPU's dense bf16 peak for MFU (H200/H100 SXM: about 790 by the peer's convention).
        shards: data mode: shards whose videos are decoded (None: synthetic source videos).
        resolutions: data mode: comma-separated 480p, 720p or HxW.
        num_frames: data mode: frames per clip.
        seconds: data mode: measuring time per configuration.
        edge: data mode: on, off or both (edge extraction on the fly).
        workers: data mode: parallel worker processes.
        teacher_steps: generation mode: Euler steps of the teacher.
        guidance: generation mode: the teacher's CFG weight (0: one network call per step, else two).
        student_steps: generation mode: student steps, t-list evenly spaced from 1.0 down.
        decode: generation mode: wan2.1 (random full-size VAE, needs diffusers), pixel (CPU tests) or none.
        decode_channels_last: generation mode: the Wan VAE's 3D convolutions run channels-last
            (WanTokenizer's `channels_last`).
        decode_compile: generation mode: torch.compile the Wan VAE's decoder (WanTokenizer's `compile`).
        modalities: generation mode: comma-separated control branches, each given random control latents.
        student_trainable: dmd2 mode: the student's trained parameters, all (base + control, the
            2b dmd2 recipe's) or control (the control branch only).
        parts: scale mode: comma-separated control (data-parallel throughput), cp_train (one
            sample split across context_parallel ranks), cp_infer (inference per step) and dmd2.
        context_parallel: scale mode: ranks one sample is split over.
        dmd2_shapes: scale mode: the shapes of the DMD2 turns (the other parts use --shapes,
            default 720p_93f).
        dmd2_checkpointing: scale mode: the DMD2 networks' checkpointing (the dmd2 recipe's full).
        sparse: generation mode: the student's sparse self-attention (the teacher stays dense):
            none, tiles:TxHxW:WTxWHxWW (tile size in tokens, window in tiles) or topk:TxHxW:K
            (tile size, key tiles kept), e.g. topk:4x4x8:110. net mode: the `sparse` key of
            `variants` instead.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be net, data, generation, dmd2 or scale, got {mode!r}")
    if mode == "data":
        from tools.bench.data import bench_data

        return bench_data(shards, resolutions, num_frames, seconds, edge, workers)
    opts = Options(
        preset=preset,
        shapes=shapes if shapes is not None else DEFAULT_SHAPES.get(mode, "480p_93f,720p_93f"),
        steps=steps,
        device=device,
        dtype=dtype,
        checkpointing={"true": "full", "false": "none"}.get(str(checkpointing).lower(), str(checkpointing)),
        compile=compile,
        attention_backend=attention_backend,
        variants=variants,
        profile=profile,
        peak_tflops=peak_tflops,
        sparse=sparse,
    )
    if mode == "scale":
        from tools.bench.scale import bench_scale

        return bench_scale(opts, dmd2_shapes, dmd2_checkpointing, parts, context_parallel)
    if mode == "generation":
        from tools.bench.generation import GenerationOptions, bench_generation

        gen = GenerationOptions(
            teacher_steps, guidance, student_steps, decode, modalities, decode_channels_last, decode_compile
        )
        return bench_generation(opts, gen)
    if mode == "dmd2":
        from tools.bench.dmd2 import bench_dmd2

        return bench_dmd2(opts, student_trainable)
    from tools.bench.net import bench_net

    return bench_net(opts, peer, infer, peer_compile_backend)
