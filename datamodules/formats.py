"""The ``text.safetensors`` member: a sample's precomputed text embedding, one writer and one reader.

The bytes are a safetensors file of two tensors: ``"emb"`` (..., L, D) in the dtype it was stored
in and ``"mask"`` (..., L) uint8, 1 on the real tokens (uint8 rather than bool so any safetensors
reader, numpy's included, can open it). Every shard writer (make-shards, encode-text, make-kd-data,
the synthetic latent shards) stores it through `save_text`, and the datamodule and
``modules.text.load_embeddings`` read it through `load_text`.
"""

from __future__ import annotations

import torch
from safetensors import SafetensorError
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

__all__ = ["TEXT_MEMBER", "load_text", "save_text"]

TEXT_MEMBER = "text.safetensors"


def save_text(
    emb: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype | None = None, metadata: dict[str, str] | None = None
) -> bytes:
    """``(emb, mask)`` as ``text.safetensors`` bytes.

    `emb` is cast to `dtype` (None: kept) on the device it is on, then moved to the CPU, so a
    caller decides where the rounding happens; `mask` (bool or integer) is stored as uint8.
    `metadata` becomes the file's string metadata.
    """
    emb = emb.detach()
    if dtype is not None:
        emb = emb.to(dtype)
    mask = mask.detach().to(torch.uint8).cpu()
    if mask.shape != emb.shape[:-1]:
        raise ValueError(f"{TEXT_MEMBER}: mask {tuple(mask.shape)} does not match emb {tuple(emb.shape)}")
    return _st_save({"emb": emb.cpu().contiguous(), "mask": mask.contiguous()}, metadata=metadata)


def load_text(data: bytes, name: str = TEXT_MEMBER) -> tuple[torch.Tensor, torch.Tensor]:
    """``(emb, mask bool)`` from `save_text`'s bytes; `name` labels the errors.

    Raises ValueError for bytes that are no safetensors file or a mask that does not fit the
    embedding, KeyError for a file without ``emb`` or ``mask``.
    """
    try:
        tensors = _st_load(data)
    except SafetensorError as e:
        raise ValueError(f"{name}: {e}") from e
    missing = [k for k in ("emb", "mask") if k not in tensors]
    if missing:
        raise KeyError(f"{name} has no {' and no '.join(missing)}")
    emb, mask = tensors["emb"], tensors["mask"]
    if mask.shape != emb.shape[:-1]:
        raise ValueError(f"{name}: mask {tuple(mask.shape)} does not match emb {tuple(emb.shape)}")
    return emb, mask.bool()
