"""`vidistill make-kd-data`: the teacher samples the dataset's prompts and controls and saves
what knowledge distillation needs, as shards the VideoDataModule reads with ``use_kd: true``.

The shard format, the trajectories and how runs split over ranks and resume are
modules/stages/kd_data.py's; this file is the command line.
"""

from __future__ import annotations

from typing import Any

from modules.flow import STUDENT_T_LIST

__all__ = ["make_kd_data"]


def make_kd_data(
    *,
    teacher: str,
    shards: str,
    out: str,
    modality: str | None = "edge",
    num_samples: int | None = None,
    num_frames: int = 93,
    height: int = 480,
    width: int = 832,
    tokenizer: str = "pixel",
    tokenizer_path: str | None = None,
    tokenizer_options: dict[str, Any] | None = None,
    text_encoder: str = "tiny",
    max_length: int = 512,
    guidance: float = 3.0,
    negative_prompt: str | None = None,
    sampler: str = "euler",
    steps: int = 35,
    shift: float = 5.0,
    t_list: list[float] = STUDENT_T_LIST,
    t_shift: float = 5.0,
    batch_size: int = 1,
    samples_per_shard: int = 100,
    store_dtype: str = "float32",
    seed: int = 0,
    device: str = "auto",
    resume: bool = True,
    progress: bool = True,
) -> None:
    """Sample the teacher on a dataset and write KD shards (see the module doc for the format).

    Args:
        teacher: the teacher network directory (base + control branch; `combine` or a control
            stage's export).
        shards: the source shards (captions + videos; controls as the datamodule delivers them).
        out: output folder.
        modality: the control the teacher follows (edge, blur, ...); none for a plain base.
        num_samples: the first this many source samples (in shard order); none: all.
        num_frames: frames per clip (from frame 0).
        height: clip height.
        width: clip width.
        tokenizer: pixel, cosmos-jit or wan2.1 (the teacher's tokenizer).
        tokenizer_path: local weights of the tokenizer.
        tokenizer_options: tokenizer constructor options, e.g. {spatial: 2}.
        text_encoder: tiny, none (shards with text.safetensors) or a local model path.
        max_length: text tokens.
        guidance: CFG weight in Cosmos's form (pred = cond + g (cond - uncond)).
        negative_prompt: the unconditional prompt; none: the null text (zero embeddings) that
            training drops captions to.
        sampler: euler or dpmpp_2m.
        steps: teacher steps.
        shift: time shift of the teacher's grid.
        t_list: the student's times before `t_shift`; the states at these are saved.
        t_shift: shift of the student's t-list.
        batch_size: samples per teacher batch.
        samples_per_shard: samples per output shard.
        store_dtype: dtype of the saved latents and embeddings (float32, bfloat16, float16).
        seed: noise seed.
        device: auto (cuda:LOCAL_RANK when available, else cpu), cpu or cuda[:i].
        resume: keep shards a previous identical run finished.
        progress: show a progress bar.
    """
    from modules.stages import kd_data

    kd_data.check_options(store_dtype, batch_size)
    source = kd_data.KDTeacher.load(
        teacher,
        modality=modality,
        tokenizer=tokenizer,
        tokenizer_path=tokenizer_path,
        tokenizer_options=tokenizer_options,
        text_encoder=text_encoder,
        max_length=max_length,
        sampler=sampler,
        steps=steps,
        guidance=guidance,
        shift=shift,
        t_list=t_list,
        t_shift=t_shift,
        negative_prompt=negative_prompt,
        seed=seed,
        device=device,
    )
    kd_data.write_kd_shards(
        source,
        shards,
        out,
        num_samples=num_samples,
        num_frames=num_frames,
        height=height,
        width=width,
        batch_size=batch_size,
        samples_per_shard=samples_per_shard,
        store_dtype=store_dtype,
        resume=resume,
        progress=progress,
    )
