"""Text conditioning: a frozen transformers text encoder and precomputed embeddings.

Two encoder kinds, chosen from the checkpoint's config:

* ``"t5"``: a T5 / mT5 / UMT5 encoder (or the encoder of any encoder-decoder model); the
  embedding is the encoder's last hidden state, ``D = d_model`` (Cosmos-Predict2 / Transfer1,
  Wan2.1's UMT5).
* ``"llm"``: a decoder-only LLM (Cosmos-Transfer2.5 uses the Qwen2.5-VL based Cosmos-Reason1);
  the embedding is every transformer layer's hidden state concatenated along the features,
  ``D = num_layers * hidden_size`` (28 x 3584 = 100352 for Reason1-7B), Cosmos's
  ``full_concat`` strategy.

Prompts are padded or truncated to exactly ``max_length`` tokens so every batch has the same
shape, and the returned boolean mask marks the real tokens; the first prompt that is cut is
logged (once per encoder) with its length and the limit. Nothing here downloads:
checkpoints load from local directories only, and :meth:`TextEncoder.tiny` builds the
embedded default encoder from a config and a seed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from datamodules.formats import load_text, save_text

log = logging.getLogger(__name__)

__all__ = [
    "ByteTokenizer",
    "TextEncoder",
    "as_text_condition",
    "encode_prompts",
    "infer_mask",
    "iter_encode",
    "layer_normalize",
    "load_embeddings",
    "save_embeddings",
]

PathLike = str | os.PathLike


def layer_normalize(h: Tensor, eps: float = 1e-8) -> Tensor:
    """Normalise each token's feature vector to zero mean and unit std, as Cosmos does.

    Matches ``mean_normalize`` in Cosmos-Predict2.5's Reason1 text encoder:
    ``(h - mean) / (std + eps)`` over the last dim, with torch's default (unbiased) std. It is
    computed in float32 because a bf16 std over 3584 features loses precision.
    """
    x = h.float()
    x = (x - x.mean(dim=-1, keepdim=True)) / (x.std(dim=-1, keepdim=True) + eps)
    return x.to(h.dtype)


class ByteTokenizer:
    """Tokenizer with no vocabulary file: UTF-8 bytes shifted past two special ids.

    ``pad = 0``, ``eos = 1``, byte ``b`` -> ``b + 2``; an EOS ends every prompt (as T5's
    tokenizer does) and survives truncation. Called like a transformers tokenizer with
    ``padding="max_length"``, so :class:`TextEncoder` needs one code path for both.
    """

    pad_token_id = 0
    eos_token_id = 1
    offset = 2
    vocab_size = 256 + offset

    def __call__(self, prompts: Sequence[str], max_length: int, **_: object) -> dict[str, Tensor]:
        ids = torch.full((len(prompts), max_length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(prompts), max_length, dtype=torch.long)
        for i, prompt in enumerate(prompts):
            toks = [b + self.offset for b in prompt.encode("utf-8")][: max_length - 1]
            toks.append(self.eos_token_id)
            ids[i, : len(toks)] = torch.tensor(toks)
            mask[i, : len(toks)] = 1
        return {"input_ids": ids, "attention_mask": mask}


class TextEncoder(nn.Module):
    """Frozen text encoder: ``encode(prompts) -> (emb (B, L, D), mask (B, L) bool)``.

    Args:
        model: a transformers encoder (``kind="t5"``) or decoder LLM base model (``"llm"``).
        tokenizer: a transformers tokenizer or :class:`ByteTokenizer`.
        kind: ``"t5"`` or ``"llm"``.
        max_length: every prompt is padded/truncated to exactly this many tokens (Cosmos: 512).
        normalize_layers: LLM only. Normalise each layer's hidden state per token (zero mean,
            unit std over features, :func:`layer_normalize`) before concatenating. Default True,
            because Cosmos-Predict2.5 / Transfer2.5 do exactly this for every layer
            (``TextEncoder.compute_text_embeddings_online`` in
            ``cosmos_predict2/_src/predict2/text_encoders/text_encoder.py``); their DiT's text
            projection was trained on normalised features, and raw LLM layers differ in scale
            by orders of magnitude, so concatenating them raw would let a few layers dominate.
        zero_pad: zero the embedding at padded positions (default True), so padding carries no
            information and a mask can be recovered from the embedding alone
            (:func:`as_text_condition`). Cosmos's T5 path zero-pads; its Reason1 path does not
            (the DiT sees the hidden states of the pad tokens), so set False for exact parity
            with Cosmos-Transfer2.5 weights.

    Padding is always on the right: real tokens keep positions ``0..n-1`` as in Cosmos, and the
    LLM is run without an attention mask, as Cosmos runs it: with causal attention and right
    padding the real tokens never see the pads, so the mask would change nothing there and
    would only risk fully-masked rows (NaN) for an empty prompt.

    The module stays in eval mode even when a parent calls ``.train()`` (T5 checkpoints ship
    with dropout 0.1), and its parameters never require grad. Keep it out of checkpointed
    modules or use precomputed embeddings: a 7B encoder should not ride along in checkpoints.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: object,
        kind: str,
        max_length: int = 512,
        normalize_layers: bool = True,
        zero_pad: bool = True,
    ) -> None:
        super().__init__()
        if kind not in ("t5", "llm"):
            raise ValueError(f"kind must be 't5' or 'llm', got {kind!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.kind = kind
        self.max_length = max_length
        self.normalize_layers = normalize_layers
        self.zero_pad = zero_pad
        self._warned_long = False  # an over-long prompt is said once per encoder, not per batch
        if getattr(tokenizer, "pad_token_id", None) is None:
            # Decoder LLM tokenizers often have no pad token; EOS is the usual stand-in.
            if getattr(tokenizer, "eos_token", None) is None:
                raise ValueError("tokenizer has neither a pad nor an eos token")
            tokenizer.pad_token = tokenizer.eos_token
        if hasattr(tokenizer, "padding_side"):
            tokenizer.padding_side = "right"
        cfg = model.config.get_text_config()
        self._out_dim = cfg.d_model if kind == "t5" else cfg.num_hidden_layers * cfg.hidden_size
        self.requires_grad_(False)
        self.eval()

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path: PathLike,
        max_length: int = 512,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        tokenizer_path: PathLike | None = None,
        normalize_layers: bool = True,
        zero_pad: bool = True,
    ) -> TextEncoder:
        """Load model and tokenizer from a local transformers directory (never the hub).

        ``tokenizer_path`` defaults to ``path``; set it for layouts that keep the tokenizer in
        its own folder (diffusers' ``text_encoder/`` + ``tokenizer/``). A full T5 or
        encoder-decoder checkpoint loads just its encoder.
        """
        from transformers import (
            AutoConfig,
            AutoModel,
            AutoTokenizer,
            MT5EncoderModel,
            T5EncoderModel,
            UMT5EncoderModel,
        )

        kwargs: dict = {"local_files_only": True}
        if dtype is not None:
            kwargs["dtype"] = dtype
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        t5_classes = {"t5": T5EncoderModel, "mt5": MT5EncoderModel, "umt5": UMT5EncoderModel}
        if config.model_type in t5_classes:
            # Checked before is_encoder_decoder: a saved T5EncoderModel's config says False.
            model, kind = t5_classes[config.model_type].from_pretrained(path, **kwargs), "t5"
        elif config.is_encoder_decoder:
            model, kind = AutoModel.from_pretrained(path, **kwargs).get_encoder(), "t5"
        else:
            model, kind = AutoModel.from_pretrained(path, **kwargs), "llm"
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or path, local_files_only=True)
        enc = cls(model, tokenizer, kind, max_length, normalize_layers, zero_pad)
        return enc.to(device) if device is not None else enc

    @classmethod
    def tiny(
        cls,
        seed: int = 0,
        max_length: int = 64,
        d_model: int = 32,
        num_layers: int = 2,
        num_heads: int = 2,
        d_ff: int = 64,
    ) -> TextEncoder:
        """The embedded default: a small random T5 encoder + :class:`ByteTokenizer`.

        Weights come from ``seed`` through a local generator and our own init rule (normal with
        std ``fan_in ** -0.5``, norm gains 1), not transformers' init code, so the same prompt
        gives the same embedding on any machine and transformers version. Torch's global RNG is
        left untouched. Output dim is ``d_model``.
        """
        from transformers import T5Config, T5EncoderModel

        config = T5Config(
            vocab_size=384,  # bytes + specials fit in 258; the rest is headroom
            d_model=d_model,
            d_kv=d_model // num_heads,
            d_ff=d_ff,
            num_layers=num_layers,
            num_heads=num_heads,
            dropout_rate=0.0,
            pad_token_id=ByteTokenizer.pad_token_id,
            eos_token_id=ByteTokenizer.eos_token_id,
            decoder_start_token_id=ByteTokenizer.pad_token_id,
        )
        with torch.random.fork_rng(devices=[]):  # transformers' init draws from the global RNG
            model = T5EncoderModel(config)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():  # registration order: fixed by the architecture
                if p.ndim == 1:
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, p.shape[-1] ** -0.5, generator=gen)
        return cls(model, ByteTokenizer(), "t5", max_length=max_length)

    # -- properties -----------------------------------------------------------------------

    @property
    def out_dim(self) -> int:
        """Feature size D of the embeddings."""
        return self._out_dim

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def train(self, mode: bool = True) -> TextEncoder:
        """Ignore ``mode``: the encoder is frozen and must never run dropout."""
        return super().train(False)

    # -- encoding -------------------------------------------------------------------------

    def tokenize(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Token ids (B, max_length) long and mask (B, max_length) bool, on CPU."""
        out = self.tokenizer(
            list(prompts),
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        mask = out["attention_mask"].bool()
        if not self._warned_long and mask[:, -1].any():  # a prompt fills every position: cut?
            self._warn_long(prompts, mask[:, -1])
        return out["input_ids"], mask

    def _warn_long(self, prompts: Sequence[str], full: Tensor) -> None:
        """Say, once, that a prompt was truncated to max_length tokens (it was silently)."""
        for prompt in (p for p, f in zip(prompts, full.tolist(), strict=True) if f):
            if isinstance(self.tokenizer, ByteTokenizer):
                n = len(prompt.encode("utf-8")) + 1  # its bytes and the EOS
            else:
                n = len(self.tokenizer(prompt, truncation=False)["input_ids"])
            if n > self.max_length:
                log.warning(
                    "a prompt of %d tokens (%d characters) is longer than the text encoder's max_length "
                    "(%d): only its first %d tokens are used (said once)",
                    n,
                    len(prompt),
                    self.max_length,
                    self.max_length,
                )
                self._warned_long = True
                return

    @torch.no_grad()
    def encode(self, prompts: Sequence[str] | str) -> tuple[Tensor, Tensor]:
        """Encode prompts to ``(emb (B, max_length, out_dim), mask (B, max_length) bool)``.

        ``emb`` is in the model's dtype on its device; see the class doc for zero padding.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        ids, mask = self.tokenize(prompts)
        ids, mask = ids.to(self.device), mask.to(self.device)
        if self.kind == "t5":
            emb = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        else:
            out = self.model(input_ids=ids, output_hidden_states=True, use_cache=False)
            layers = out.hidden_states[1:]  # entry 0 is the input embedding, not a layer
            if self.normalize_layers:
                layers = [layer_normalize(h) for h in layers]
            emb = torch.cat(layers, dim=-1)
        if self.zero_pad:
            # masked_fill, not multiply: a NaN at a pad position must not survive as NaN * 0.
            emb = emb.masked_fill(~mask[..., None], 0)
        return emb, mask

    def forward(self, prompts: Sequence[str] | str) -> tuple[Tensor, Tensor]:
        """Same as :meth:`encode`."""
        return self.encode(prompts)


def build_text_encoder(name: str, max_length: int) -> TextEncoder | None:
    """`tiny` (the seeded default), `none` (callers bring precomputed embeddings) or a local
    transformers directory: the one reading of a recipe's text-encoder setting."""
    if name == "none":
        return None
    if name == "tiny":
        return TextEncoder.tiny(max_length=max_length)
    return TextEncoder.from_pretrained(name, max_length=max_length)


def iter_encode(
    encoder: TextEncoder, prompts: Sequence[str], batch_size: int = 16, progress: bool = True
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``encoder.encode`` of consecutive batches of ``prompts``, with a progress bar.

    Use this to stream large lists to disk: LLM embeddings are ~100 MB per prompt in bf16.
    """
    starts = range(0, len(prompts), batch_size)
    for i in tqdm(starts, desc="encode text", unit="batch", disable=not progress):
        yield encoder.encode(list(prompts[i : i + batch_size]))


def encode_prompts(
    encoder: TextEncoder, prompts: Sequence[str], batch_size: int = 16, progress: bool = True
) -> tuple[Tensor, Tensor]:
    """Encode a list of prompts in batches; returns ``(emb, mask)`` for all of them, on CPU."""
    parts = [(e.cpu(), m.cpu()) for e, m in iter_encode(encoder, prompts, batch_size, progress)]
    if not parts:
        empty = (0, encoder.max_length)
        return torch.zeros(*empty, encoder.out_dim, dtype=encoder.dtype), torch.zeros(empty, dtype=torch.bool)
    return torch.cat([e for e, _ in parts]), torch.cat([m for _, m in parts])


# -- precomputed embeddings -------------------------------------------------------------------


def infer_mask(emb: Tensor) -> Tensor:
    """Mask of the token rows of ``emb`` that are not all zero (zero-padded embeddings)."""
    return emb.ne(0).any(dim=-1)


def save_embeddings(
    path: PathLike, emb: Tensor, mask: Tensor | None = None, metadata: dict[str, str] | None = None
) -> None:
    """Write ``emb`` (..., L, D) and ``mask`` (..., L) to a file in the shards' ``text.safetensors``
    format (`datamodules.formats.save_text`); ``mask`` defaults to :func:`infer_mask`.
    ``metadata`` is stored as the file's string metadata."""
    data = save_text(emb, infer_mask(emb) if mask is None else mask, metadata=metadata)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(data)


def load_embeddings(path: PathLike, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Read ``(emb, mask bool)`` written by :func:`save_embeddings` (or a shard's text.safetensors)."""
    emb, mask = load_text(Path(path).read_bytes(), str(path))
    return emb.to(device), mask.to(device)


def as_text_condition(
    x: Tensor | tuple[Tensor, Tensor | None] | list | PathLike,
) -> tuple[Tensor, Tensor]:
    """Normalise any text-condition input to ``(emb, mask bool)``.

    Accepts:
        * a tensor ``emb`` (B, L, D) or (L, D): the mask marks the token rows that are not all
          zero, which is exact for zero-padded embeddings (ours, Cosmos's T5); for embeddings
          that were not zero-padded it is all True, i.e. every token is attended.
        * a tuple/list ``(emb, mask)``: the mask is cast to bool (uint8/int/float accepted);
          ``mask=None`` is inferred as above.
        * a path (str or PathLike) to a file written by :func:`save_embeddings`.

    Shapes are returned as given (no batch dimension is added).
    """
    if isinstance(x, (str, os.PathLike)):
        return load_embeddings(x)
    if isinstance(x, Tensor):
        return x, infer_mask(x)
    if isinstance(x, (tuple, list)) and len(x) == 2:
        emb, mask = x
        mask = infer_mask(emb) if mask is None else mask.to(device=emb.device).bool()
        if mask.shape != emb.shape[:-1]:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match emb {tuple(emb.shape)}")
        return emb, mask
    raise TypeError(f"cannot make a text condition from {type(x).__name__}")
