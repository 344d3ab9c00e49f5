"""Lightning's ModelParallelStrategy with plain-FSDP defaults.

Its "auto" sizes mean data parallel = number of nodes and tensor parallel = GPUs per node, which
is not what FSDP2-only training wants (and silently shards nothing across a node). Here the
defaults are tensor_parallel_size=1 and data_parallel_size=world size, resolved at launch, so a
recipe needs no edit when the number of nodes or devices changes.

`context_parallel_size` > 1 splits each sample's tokens over that many consecutive ranks
(modules/nets/context.py). The device mesh is then (data_parallel, context_parallel,
tensor_parallel) with the first two flattened into `dp_cp`: networks are sharded over dp_cp
(torchtitan's dp_shard_cp), so parameters and gradients stay in sync on every rank, while data
and per-sample randomness follow the data_parallel dimension alone (the ranks of one context
group read the same batch and draw the same noise). Lightning's `distributed_sampler_kwargs`
already reads the data_parallel dimension.
"""

from __future__ import annotations

from datetime import timedelta

from lightning.pytorch.strategies import ModelParallelStrategy

from modules.parallel import context_mesh


class FSDP2Strategy(ModelParallelStrategy):
    def __init__(
        self,
        data_parallel_size: int | str = "world",
        tensor_parallel_size: int = 1,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        context_parallel_size: int = 1,
        collective_timeout_s: float | None = None,
    ):
        """
        Args:
            data_parallel_size: "world" (world / context_parallel_size data-parallel groups) or an explicit size.
            tensor_parallel_size: 1 (no tensor parallelism: networks are sharded with FSDP2 only).
            save_distributed_checkpoint: sharded (DCP) checkpoints, one file per rank.
            process_group_backend: None picks nccl on GPUs and gloo on CPUs.
            context_parallel_size: ranks that split one sample's tokens (sequence) between them
                (1: off). Must divide the world size and the networks' attention heads (16 for
                2b); consecutive ranks form a group, so keep it within a node (NVLink).
            collective_timeout_s: seconds a collective may wait for the other ranks before it
                fails with an error instead of hanging (None: torch's default, 30 minutes).
        """
        if context_parallel_size < 1:
            raise ValueError(f"context_parallel_size must be >= 1, got {context_parallel_size}")
        super().__init__(
            data_parallel_size=1,
            tensor_parallel_size=tensor_parallel_size,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            **({} if collective_timeout_s is None else {"timeout": timedelta(seconds=collective_timeout_s)}),
        )
        self._requested_dp = data_parallel_size
        self.context_parallel_size = context_parallel_size

    def setup_environment(self) -> None:
        world = self.num_nodes * self.num_processes
        tp, cp = self._tensor_parallel_size, self.context_parallel_size
        if world % (tp * cp):
            raise ValueError(
                f"context_parallel_size {cp} x tensor_parallel_size {tp} does not divide the world "
                f"size {world} ({self.num_nodes} nodes x {self.num_processes} devices)"
            )
        dp = world // (tp * cp) if self._requested_dp == "world" else int(self._requested_dp)
        if dp * cp * tp != world:
            raise ValueError(
                f"data_parallel_size {dp} x context_parallel_size {cp} x tensor_parallel_size {tp} "
                f"!= world size {world} ({self.num_nodes} nodes x {self.num_processes} devices)"
            )
        # Lightning builds its (data_parallel, tensor_parallel) mesh over dp x cp ...
        self._data_parallel_size = dp * cp
        super().setup_environment()
        if cp > 1:  # ... which a (data_parallel, context_parallel, tensor_parallel) mesh replaces
            self._device_mesh = context_mesh(self.root_device.type, dp, cp, tp)
            self.lightning_module._device_mesh = self._device_mesh
        self._data_parallel_size = dp
