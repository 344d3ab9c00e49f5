"""The video DiT with the Cosmos-Predict2.5 block structure, in plain torch.

Per block: adaLN-LoRA modulated self-attention (RMS QK-norm, 3D RoPE), cross-attention to text,
GELU MLP, each with a gated residual. Inputs are latents (B, C, T, H, W) at rectified-flow time t;
the output, in the same layout, is the velocity v = eps - x0 or the clean latent x0 according to
`NetConfig.prediction` (modules/nets/presets.py). The DiT itself does not know which: `Denoiser`
(modules/denoiser.py) interprets its head's output.

The forward pass is split in three so control branches can share the base's work:
`prepare` embeds inputs, timestep, text and positions once into a `State`; `run_blocks` runs the
trunk, adding control residuals after the blocks they target; `head` un-patchifies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from .attention import attention
from .context import Shard, check_heads
from .sparse import SparseAttention


@dataclass
class DiTConfig:
    """Shape of the base network. Field names are ours; `tools/import_weights.py` maps diffusers' ones."""

    latent_channels: int = 16
    """Tokenizer latent channels; the input also gets a condition-mask and a padding-mask channel."""
    dim: int = 2048
    """Model width (heads x head_dim)."""
    depth: int = 28
    heads: int = 16
    mlp_ratio: float = 4.0
    text_dim: int = 1024
    """Width of the text context the cross-attention reads."""
    text_proj_in: int | None = None
    """If set, text embeddings of this width go through Linear+GELU to `text_dim` first
    (Transfer2.5: 100352 = 28 layers x 3584 of concatenated LLM hidden states)."""
    adaln_lora_dim: int = 256
    patch: tuple[int, int, int] = (1, 2, 2)
    rope_scale: tuple[float, float, float] = (1.0, 3.0, 3.0)
    """NTK scaling of the RoPE base per (t, h, w) axis."""
    base_fps: float = 24.0
    """Temporal RoPE positions are frame index * base_fps / fps, so clips at other rates line up."""
    qk_norm_eps: float = 1e-5
    sparse: SparseAttention | None = None
    """Sparse self-attention of every block, base and control (modules/nets/sparse.py); None is
    dense. Cross-attention is always dense."""

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    def __post_init__(self) -> None:
        self.patch = tuple(self.patch)
        self.rope_scale = tuple(self.rope_scale)
        if isinstance(self.sparse, dict):
            self.sparse = SparseAttention.from_dict(self.sparse)
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}")


# The GPU peak MFU is reported against, in TFLOP/s: 790 is the dense-bf16 figure the peer
# benchmark (`vidistill bench --peer diffusers`) has always divided by, so MFU numbers compare
# across runs and with it (NVIDIA's H200 SXM datasheet lists 989 dense bf16 TFLOP/s).
PEAK_TFLOPS = 790.0


def forward_flops(dim: int, tokens: int, blocks: int, text_tokens: int = 512, attended: float = 1.0) -> float:
    """Matmul FLOPs of one forward through `blocks` DiT blocks, counted as the peer benchmark
    counts them: per token 2 (4 d^2 self-attn qkvo + 2 d^2 cross q/o + 8 d^2 MLP) + 4 S d
    (QK^T and AV over S tokens) + 4 L d (cross-attention over L text tokens). `attended`: the
    share of the S keys each query attends to (sparse attention's kept fraction)."""
    per_token = 2 * (4 + 2 + 8) * dim * dim + 4 * attended * tokens * dim + 4 * text_tokens * dim
    return blocks * tokens * per_token


@dataclass
class State:
    """Everything the blocks of the base and of its control branches share for one forward."""

    x: torch.Tensor  # (B, S, D) embedded input tokens
    emb: torch.Tensor  # (B, Tm, 1, D) normalised timestep embedding, Tm in {1, T}
    lora: torch.Tensor  # (B, Tm, 1, 3D) timestep part of the adaLN-LoRA modulation
    rope: tuple[torch.Tensor, torch.Tensor]  # cos, sin (S, head_dim), fp32
    text: torch.Tensor  # (B, L, text_dim)
    text_mask: torch.Tensor | None  # (B, L) bool
    masks: torch.Tensor  # (B, 2, T, H, W) condition-mask and padding-mask channels
    grid: tuple[int, int, int]  # token grid (T', H', W') of the whole sequence
    shard: Shard | None = None  # context parallelism: x, rope, emb and lora hold this rank's frames

    def local(self, tokens: torch.Tensor) -> torch.Tensor:
        """This rank's part of (B, S, ...) tokens of the whole grid (all of them without context parallelism)."""
        return tokens if self.shard is None else self.shard.local(tokens)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight, the statistics in fp32 (bf16 squares lose precision)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def timestep_features(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features [cos(t w_i), sin(t w_i)], w_i = 10000^(-i / (dim/2)) (Vaswani et al. 2017, sec. 3.5)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[..., None] * freqs
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def rope_tables(
    cfg: DiTConfig, grid: tuple[int, int, int], fps: float | None, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (S, head_dim) of the 3D rotary embedding (Su et al. 2021, eq. 34, per axis).

    The head dimension is split into t/h/w bands (h and w get 2*floor(hd/6) each, t the rest); each
    axis uses base 10000 * scale^(d/(d-2)) (NTK-aware scaling). Time positions are in units of
    `base_fps` frames when fps is given.
    """
    hd = cfg.head_dim
    dh = dw = hd // 6 * 2
    dt = hd - dh - dw
    nt, nh, nw = grid

    def freqs(d: int, scale: float) -> torch.Tensor:
        theta = 10000.0 * scale ** (d / (d - 2))
        return 1.0 / theta ** (torch.arange(0, d, 2, device=device, dtype=torch.float32)[: d // 2] / d)

    pos_t = torch.arange(nt, device=device, dtype=torch.float32)
    if fps is not None:
        pos_t = pos_t / fps * cfg.base_fps
    at = torch.outer(pos_t, freqs(dt, cfg.rope_scale[0]))
    ah = torch.outer(torch.arange(nh, device=device, dtype=torch.float32), freqs(dh, cfg.rope_scale[1]))
    aw = torch.outer(torch.arange(nw, device=device, dtype=torch.float32), freqs(dw, cfg.rope_scale[2]))
    angles = torch.cat(
        [
            at[:, None, None].expand(nt, nh, nw, -1),
            ah[None, :, None].expand(nt, nh, nw, -1),
            aw[None, None, :].expand(nt, nh, nw, -1),
        ],
        dim=-1,
    ).reshape(nt * nh * nw, -1)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate (B, S, H, D) by the tables: x cos + rotate_half(x) sin, rotate_half(a, b) = (-b, a); fp32 math."""
    cos, sin = (r[:, None, :] for r in rope)
    a, b = x.float().chunk(2, dim=-1)
    return (x.float() * cos + torch.cat([-b, a], dim=-1) * sin).to(x.dtype)


class AdaLNLoRA(nn.Module):
    """Low-rank timestep modulation: chunks of up(down(silu(emb))) + lora (Cosmos' adaLN-LoRA)."""

    def __init__(self, dim: int, rank: int, chunks: int, device=None, dtype=None):
        super().__init__()
        self.chunks = chunks
        self.down = nn.Linear(dim, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, chunks * dim, bias=False, device=device, dtype=dtype)

    def forward(self, emb: torch.Tensor, lora: torch.Tensor) -> list[torch.Tensor]:
        mod = self.up(self.down(F.silu(emb))) + lora[..., : self.up.out_features]
        return list(mod.chunk(self.chunks, dim=-1))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm(x) (1 + scale) + shift, with (B, Tm, 1, D) modulation broadcast over each frame's tokens."""
    B, S, D = x.shape
    xn = F.layer_norm(x, (D,), eps=eps).view(B, shift.shape[1], -1, D)
    return (xn * (1 + scale) + shift).view(B, S, D)


def gated(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x + gate * y with per-frame gates."""
    B, S, D = x.shape
    return x + (gate * y.view(B, gate.shape[1], -1, D)).view(B, S, D)


class SelfAttention(nn.Module):
    def __init__(self, cfg: DiTConfig, device=None, dtype=None):
        super().__init__()
        self.heads, self.sparse = cfg.heads, cfg.sparse
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False, device=device, dtype=dtype)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.qk_norm_eps, device, dtype)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.qk_norm_eps, device, dtype)
        self.out = nn.Linear(cfg.dim, cfg.dim, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, rope, shard: Shard | None = None, grid=None) -> torch.Tensor:
        B, S, _ = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.heads, -1).unbind(2)
        q = apply_rope(self.q_norm(q), rope)
        k = apply_rope(self.k_norm(k), rope)
        return self.out(attention(q, k, v, shard=shard, sparse=self.sparse, grid=grid).flatten(2))


def set_sparse(module: nn.Module, sparse: SparseAttention | None) -> None:
    """Switch the self-attention of every block in `module` to `sparse` (None: dense), weights
    untouched: how a benchmark measures one set of weights dense and sparse. A network built
    sparse has the field in its config (`DiTConfig.sparse`) instead."""
    for m in module.modules():
        if isinstance(m, SelfAttention):
            m.sparse = sparse


class CrossAttention(nn.Module):
    def __init__(self, cfg: DiTConfig, device=None, dtype=None):
        super().__init__()
        self.heads = cfg.heads
        self.q = nn.Linear(cfg.dim, cfg.dim, bias=False, device=device, dtype=dtype)
        self.kv = nn.Linear(cfg.text_dim, 2 * cfg.dim, bias=False, device=device, dtype=dtype)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.qk_norm_eps, device, dtype)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.qk_norm_eps, device, dtype)
        self.out = nn.Linear(cfg.dim, cfg.dim, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None) -> torch.Tensor:
        B, S, _ = x.shape
        q = self.q_norm(self.q(x).view(B, S, self.heads, -1))
        k, v = self.kv(text).view(B, text.shape[1], 2, self.heads, -1).unbind(2)
        return self.out(attention(q, self.k_norm(k), v, text_mask).flatten(2))


class MLP(nn.Module):
    def __init__(self, cfg: DiTConfig, device=None, dtype=None):
        super().__init__()
        hidden = int(cfg.dim * cfg.mlp_ratio)
        self.fc1 = nn.Linear(cfg.dim, hidden, bias=False, device=device, dtype=dtype)
        self.fc2 = nn.Linear(hidden, cfg.dim, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


# The fused attention kernels SDPA dispatches to (the CPU one exists only on some builds).
_ATTENTION_OPS = {
    getattr(torch.ops.aten, name).default
    for name in (
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
    )
    if hasattr(torch.ops.aten, name)
}
# Ops whose outputs selective checkpointing keeps: matmuls and attention are the costly ones to
# redo; norms, modulation, RoPE and GELU are cheap to recompute but take most of the memory.
_SAVE_OPS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default} | _ATTENTION_OPS


def _selective_policy(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


# At video lengths attention is most of a block's time (S^2 against S d^2: at 84k tokens and
# d = 2048 its forward is about 6x the block's matmuls), and its output is one (S, d) tensor:
# keeping only that, and recomputing the matmuls and everything cheap, saves most of full
# checkpointing's recompute time for about three (S, d) tensors per block.
def _attention_policy(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in _ATTENTION_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context():
    return create_selective_checkpoint_contexts(_selective_policy)


def _attention_context():
    return create_selective_checkpoint_contexts(_attention_policy)


def checkpoint_plan(mode: str | bool, n_blocks: int) -> list[bool | str]:
    """Per-block `Block.checkpoint` values, in execution order, for an activation-checkpointing mode.

    none (or false): keep every activation; full (or true): recompute every block in backward;
    selective: keep matmul and attention outputs, recompute norms, modulation, RoPE and GELU;
    attention: keep only the attention outputs, recompute the rest (matmuls included);
    partial:N: full on the first N blocks, none on the rest; partial:N:REST: full on the first N
    blocks, REST (none, selective or attention) on the others. Partial modes trade the memory a
    GPU has to spare for recomputation: which blocks keep their activations does not change the
    peak (all are held at the end of the forward), so the first ones (control blocks, whose
    trainable weights make them the dearest to keep) are the ones recomputed.
    """
    if isinstance(mode, bool):
        mode = "full" if mode else "none"
    mode = {"true": "full", "false": "none"}.get(mode.lower(), mode.lower())
    flag = {"none": False, "full": True, "selective": "selective", "attention": "attention"}
    if mode in flag:
        return [flag[mode]] * n_blocks
    parts = mode.split(":")
    rest = parts[2] if len(parts) == 3 else "none"
    if parts[0] == "partial" and len(parts) in (2, 3) and parts[1].isdigit() and rest in flag and rest != "full":
        n = min(int(parts[1]), n_blocks)
        rest = flag[rest]
        return [True] * n + [rest] * (n_blocks - n)
    raise ValueError(
        f"unknown checkpointing mode {mode!r}: choose none, full, selective, attention, partial:N or partial:N:REST"
    )


def _run_block(block: Block, x: torch.Tensor, s: State) -> torch.Tensor:
    if block.checkpoint and torch.is_grad_enabled():
        context = {"selective": _selective_context, "attention": _attention_context}.get(block.checkpoint)
        if context is not None:
            return checkpoint(block._forward, x, s, use_reentrant=False, context_fn=context)
        return checkpoint(block._forward, x, s, use_reentrant=False)
    return block._forward(x, s)


# One compiled entry point per torch.compile backend, shared by every block: the blocks have the
# same code and shapes, so Dynamo compiles once and reuses the graph (parameters are graph
# inputs), and a block copied with copy.deepcopy cannot end up calling its original's weights as
# a per-instance compiled bound method would. Module hooks (FSDP2's all-gathers) stay eager
# because only the block's computation is compiled, not its __call__.
_COMPILED: dict[str, object] = {}


def _compiled_run(backend: str):
    if backend not in _COMPILED:
        # dynamic=False: a run has one or two token counts; kernels specialised to them beat
        # symbolic-shape ones, and a new shape only costs one more compilation
        _COMPILED[backend] = torch.compile(_run_block, backend=backend, dynamic=False)
    return _COMPILED[backend]


class Block(nn.Module):
    """One DiT block.

    `checkpoint`: False keeps all activations; True (or "full") recomputes the block in the
    backward pass; "selective" keeps matmul and attention outputs and recomputes the rest;
    "attention" keeps only attention outputs.
    `compile_backend`: None runs eagerly; a torch.compile backend name ("inductor") compiles the
    block's computation, its checkpointed region included (the compiler then plans the
    recomputation). Not nn.Module.compile, which would also trace the module's hooks.
    """

    def __init__(self, cfg: DiTConfig, device=None, dtype=None):
        super().__init__()
        self.checkpoint: bool | str = False
        self.compile_backend: str | None = None
        self.mod_sa = AdaLNLoRA(cfg.dim, cfg.adaln_lora_dim, 3, device, dtype)
        self.sa = SelfAttention(cfg, device, dtype)
        self.mod_ca = AdaLNLoRA(cfg.dim, cfg.adaln_lora_dim, 3, device, dtype)
        self.ca = CrossAttention(cfg, device, dtype)
        self.mod_mlp = AdaLNLoRA(cfg.dim, cfg.adaln_lora_dim, 3, device, dtype)
        self.mlp = MLP(cfg, device, dtype)

    def forward(self, x: torch.Tensor, s: State) -> torch.Tensor:
        if self.compile_backend:
            return _compiled_run(self.compile_backend)(self, x, s)
        return _run_block(self, x, s)

    def _forward(self, x: torch.Tensor, s: State) -> torch.Tensor:
        shift, scale, gate = self.mod_sa(s.emb, s.lora)
        x = gated(x, gate, self.sa(modulate(x, shift, scale), s.rope, s.shard, s.grid))
        shift, scale, gate = self.mod_ca(s.emb, s.lora)
        x = gated(x, gate, self.ca(modulate(x, shift, scale), s.text, s.text_mask))
        shift, scale, gate = self.mod_mlp(s.emb, s.lora)
        return gated(x, gate, self.mlp(modulate(x, shift, scale)))


def patchify(x: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, T'H'W', C pt ph pw), channel-major inside a patch (Cosmos' order)."""
    B, C, T, H, W = x.shape
    pt, ph, pw = patch
    x = x.reshape(B, C, T // pt, pt, H // ph, ph, W // pw, pw)
    return x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(B, (T // pt) * (H // ph) * (W // pw), -1)


def unpatchify(x: torch.Tensor, patch: tuple[int, int, int], grid: tuple[int, int, int]) -> torch.Tensor:
    """(B, S, ph pw pt C) -> (B, C, T, H, W); Cosmos' output projection orders a patch (ph, pw, pt, C)."""
    B = x.shape[0]
    pt, ph, pw = patch
    nt, nh, nw = grid
    x = x.reshape(B, nt, nh, nw, ph, pw, pt, -1)
    return x.permute(0, 7, 1, 6, 2, 4, 3, 5).reshape(B, -1, nt * pt, nh * ph, nw * pw)


class DiT(nn.Module):
    """Cosmos-Predict2.5-structured video DiT. Its head outputs the velocity or x0, as the
    network's `NetConfig.prediction` says (interpreted by `Denoiser`)."""

    def __init__(self, cfg: DiTConfig, device=None, dtype=None):
        super().__init__()
        self.cfg = cfg
        D, p = cfg.dim, math.prod(cfg.patch)
        self.x_embed = nn.Linear((cfg.latent_channels + 2) * p, D, bias=False, device=device, dtype=dtype)
        self.t_fc1 = nn.Linear(D, D, bias=False, device=device, dtype=dtype)
        self.t_fc2 = nn.Linear(D, 3 * D, bias=False, device=device, dtype=dtype)
        self.t_norm = RMSNorm(D, 1e-6, device, dtype)
        self.text_proj = None
        if cfg.text_proj_in:
            self.text_proj = nn.Linear(cfg.text_proj_in, cfg.text_dim, device=device, dtype=dtype)
        self.blocks = nn.ModuleList(Block(cfg, device, dtype) for _ in range(cfg.depth))
        self.final_mod = AdaLNLoRA(D, cfg.adaln_lora_dim, 2, device, dtype)
        self.final = nn.Linear(D, p * cfg.latent_channels, bias=False, device=device, dtype=dtype)
        self.context_group = None

    def set_context_parallel(self, group) -> None:
        """Split every later forward's tokens across `group` (a torch.distributed process group
        of more than one rank; None turns it off). Inputs and outputs stay whole on every rank:
        `prepare` keeps this rank's frames, `head` and tapped features gather them back
        (modules/nets/context.py). Every rank of the group must make the same calls with the
        same inputs."""
        if group is not None:
            if self.cfg.sparse is not None:
                raise ValueError("sparse self-attention does not run context-parallel: use one rank per sample")
            check_heads(self.cfg.heads, group)
            if torch.distributed.get_world_size(group) == 1:
                group = None
        self.context_group = group

    def prepare(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor | None = None,
        fps: float | None = None,
        cond_mask: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
    ) -> State:
        """Embed one forward's inputs.

        x (B, C, T, H, W) latents; t (B,) or per latent frame (B, T); text (B, L, text_dim or
        text_proj_in); cond_mask (B, 1, T, H, W), 1 on conditioning latents; padding_mask
        (B or 1, 1, H_any, W_any), 1 on padded pixels, resized to the latent grid by nearest.
        """
        B, _, T, H, W = x.shape
        pt, ph, pw = self.cfg.patch
        if T % pt or H % ph or W % pw:
            raise ValueError(f"latent size {(T, H, W)} is not divisible by the patch {self.cfg.patch}")
        grid = (T // pt, H // ph, W // pw)
        if cond_mask is None:
            cond_mask = x.new_zeros(B, 1, T, H, W)
        if padding_mask is None:
            pad = x.new_zeros(B, 1, T, H, W)
        else:
            pad = F.interpolate(padding_mask.to(x.dtype), size=(H, W), mode="nearest")
            pad = pad[:, :, None].expand(B, 1, T, H, W)
        masks = torch.cat([cond_mask.to(x.dtype).expand(B, 1, T, H, W), pad], dim=1)
        tokens = self.x_embed(patchify(torch.cat([x, masks], dim=1), self.cfg.patch))

        if t.ndim == 1:
            t = t[:, None]
        if t.shape[1] not in (1, T) or pt != 1 and t.shape[1] != 1:
            raise ValueError(f"t must be (B,) or (B, {T}) for latents {tuple(x.shape)}, got {tuple(t.shape)}")
        feats = timestep_features(t, self.cfg.dim).to(tokens.dtype)[:, :, None]  # (B, Tm, 1, D)
        lora = self.t_fc2(F.silu(self.t_fc1(feats)))
        emb = self.t_norm(feats)

        if self.text_proj is not None:
            text = F.gelu(self.text_proj(text))
        rope = rope_tables(self.cfg, grid, fps, x.device)
        shard = None
        if self.context_group is not None:
            shard = Shard.plan(self.context_group, grid, x.device)
            tokens = shard.local(tokens)
            rope = tuple(shard.local_table(r) for r in rope)
            if emb.shape[1] > 1:  # per-frame modulation: this rank's frames
                emb, lora = shard.local_frames(emb), shard.local_frames(lora)
        return State(tokens, emb, lora, rope, text, text_mask, masks, grid, shard)

    def run_blocks(self, s: State, residuals: dict[int, torch.Tensor] | None = None, taps=None):
        """The trunk; residuals[i] is added to the output of block i (control injection).

        With `taps` (block indices) it returns (h, [h after each tapped block]) instead of h and
        stops after the last tapped block (h is then that block's output). Under context
        parallelism h is this rank's tokens and the tapped features are gathered whole."""
        h, feats = s.x, []
        for i, block in enumerate(self.blocks):
            h = block(h, s)
            if residuals and i in residuals:
                h = h + residuals[i]
            if taps and i in taps:
                feats.append(h)
                if len(feats) == len(set(taps)):
                    break
        if taps is not None and s.shard is not None:
            feats = [s.shard.gather(f) for f in feats]
        return h if taps is None else (h, feats)

    def head(self, h: torch.Tensor, s: State) -> torch.Tensor:
        shift, scale = self.final_mod(s.emb, s.lora)
        out = self.final(modulate(h, shift, scale))
        if s.shard is not None:  # gathered after the narrow output projection: p C channels, not dim
            out = s.shard.gather(out)
        return unpatchify(out, self.cfg.patch, s.grid)

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, **kwargs) -> torch.Tensor:
        """The head's output without control: velocity or x0 according to `NetConfig.prediction`
        (read by `Denoiser`); see `prepare` for the arguments."""
        s = self.prepare(x, t, text, **kwargs)
        return self.head(self.run_blocks(s), s)
