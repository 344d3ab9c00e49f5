"""The one sharding policy every stage applies to every network (trained or frozen).

Called from a LightningModule's `configure_model` under Lightning's ModelParallelStrategy with
tensor_parallel_size=1 and data_parallel_size=world size: FSDP2 `fully_shard` on each block
(base trunk and control branches), then on the root, so every parameter (blocks, embeddings,
heads, control projections) is under `fully_shard` and gets its gradients reduced. Parameters
left outside would silently drift apart across ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from .denoiser import Denoiser
from .dtypes import to_dtype
from .nets.dit import checkpoint_plan


@dataclass
class ShardingConfig:
    """How networks are sharded; every stage's recipe carries one under `sharding`."""

    param_dtype: str = "bfloat16"
    """Dtype parameters are all-gathered and computed in (bfloat16, float32; none keeps storage dtype)."""
    reduce_dtype: str = "float32"
    """Dtype gradients are reduce-scattered in."""
    checkpointing: str = "full"
    """Activation checkpointing per block: none, full (recompute the block), selective (keep
    matmul/attention outputs, recompute norms, modulation and activations), attention (keep only
    attention outputs, recompute the rest), partial:N (full on the first N blocks in execution
    order, control blocks first, none on the rest) or partial:N:REST (REST = none, selective or
    attention on the rest). See modules.nets.dit.checkpoint_plan."""
    compile: bool = False
    """torch.compile each block's computation (its checkpointed region included) with inductor,
    before fully_shard; FSDP2's hooks stay eager around it. The first steps pay the compilation."""

    def __post_init__(self) -> None:
        for name in ("param_dtype", "reduce_dtype"):
            to_dtype(getattr(self, name), f"sharding.{name}", allow_none=True)
        try:
            checkpoint_plan(self.checkpointing, 1)
        except ValueError as e:
            raise ValueError(f"sharding.checkpointing: {e}") from None


def mp_policy(cfg: ShardingConfig) -> MixedPrecisionPolicy:
    return MixedPrecisionPolicy(
        param_dtype=to_dtype(cfg.param_dtype, allow_none=True), reduce_dtype=to_dtype(cfg.reduce_dtype, allow_none=True)
    )


def set_checkpointing(model: Denoiser, mode: str | bool) -> None:
    """Set activation checkpointing on every block of the control branches and the trunk
    (`checkpoint_plan` modes, counted over the blocks in execution order)."""
    blocks = blocks_in_order(model)
    for block, flag in zip(blocks, checkpoint_plan(mode, len(blocks))):
        block.checkpoint = flag


def set_compile(model: Denoiser, enabled: bool, backend: str = "inductor") -> None:
    """Compile (or stop compiling) every block's computation; see ShardingConfig.compile."""
    for block in blocks_in_order(model):
        block.compile_backend = backend if enabled else None


def blocks_in_order(model: Denoiser) -> list[torch.nn.Module]:
    """Blocks in execution order: control branches run before the trunk (their residuals feed it)."""
    return [b for branch in model.controls.values() for b in branch.blocks] + list(model.net.blocks)


def shard_model(model: Denoiser, mesh: DeviceMesh | None, cfg: ShardingConfig) -> Denoiser:
    """Apply activation checkpointing, torch.compile and FSDP2 to a Denoiser (built on meta or materialised).

    Each block is its own FSDP unit so only one block's full parameters live at a time; the last
    block of the forward keeps its parameters after forward (they are needed first in backward).
    With no mesh (a single process without a process group) only checkpointing and compile are applied.
    """
    set_checkpointing(model, cfg.checkpointing)
    # compiled before fully_shard, as torchtitan orders it: only the block's inner computation is
    # compiled, so the hooks fully_shard registers on the block run eagerly around the graph
    set_compile(model, cfg.compile)
    if mesh is None:
        return model
    mp = mp_policy(cfg)
    blocks = blocks_in_order(model)
    for i, block in enumerate(blocks):
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    # stages call model.denoise / model.velocity / model.features, not only model(...):
    # each must gather the root's parameters the way forward does
    for method in ("denoise", "velocity", "features"):
        register_fsdp_forward_method(model, method)
    return model


def shard_head(module: torch.nn.Module, mesh: DeviceMesh | None, cfg: ShardingConfig) -> torch.nn.Module:
    """A small network without blocks (the GAN head): one FSDP2 unit, same precision policy."""
    if mesh is not None:
        fully_shard(module, mesh=mesh, mp_policy=mp_policy(cfg))
    return module


# --- the device mesh networks are sharded over ---------------------------------------------------


def context_mesh(device_type: str, dp: int, cp: int, tp: int = 1) -> DeviceMesh:
    """The (data_parallel, context_parallel, tensor_parallel) mesh with data x context flattened
    into `dp_cp` (what networks are sharded over). Every rank must call it."""
    mesh = init_device_mesh(
        device_type, (dp, cp, tp), mesh_dim_names=("data_parallel", "context_parallel", "tensor_parallel")
    )
    mesh["data_parallel", "context_parallel"]._flatten("dp_cp")
    return mesh


def shard_mesh(mesh: DeviceMesh | None) -> DeviceMesh | None:
    """The mesh networks are fully_shard-ed over: dp_cp under context parallelism, else data_parallel."""
    if mesh is None:
        return None
    if "context_parallel" not in (mesh.mesh_dim_names or ()):
        return mesh["data_parallel"]
    # _flatten again returns the mesh context_mesh made (slicing a flattened dim from the root is deprecated)
    return mesh["data_parallel", "context_parallel"]._flatten("dp_cp")


def context_group(mesh: DeviceMesh | None):
    """The process group of this rank's context-parallel group, or None (no mesh, or size 1)."""
    if mesh is None or "context_parallel" not in (mesh.mesh_dim_names or ()) or mesh["context_parallel"].size() == 1:
        return None
    return mesh["context_parallel"].get_group()


def data_parallel_rank(mesh: DeviceMesh | None, rank: int = 0, world: int = 1) -> tuple[int, int]:
    """(rank, size) along the data_parallel dimension, what data and per-sample randomness follow;
    (rank, world) as given without a mesh."""
    if mesh is None:
        return rank, world
    dp = mesh["data_parallel"]
    return dp.get_local_rank(), dp.size()
