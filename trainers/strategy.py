"""Lightning's ModelParallelStrategy with plain-FSDP defaults.

Its "auto" sizes mean data parallel = number of nodes and tensor parallel = GPUs per node, which
is not what FSDP2-only training wants (and silently shards nothing across a node). Here the
defaults are tensor_parallel_size=1 and data_parallel_size=world size, resolved at launch, so a
recipe needs no edit when the number of nodes or devices changes.
"""

from __future__ import annotations

from lightning.pytorch.strategies import ModelParallelStrategy


class FSDP2Strategy(ModelParallelStrategy):
    def __init__(self, data_parallel_size: int | str = "world", tensor_parallel_size: int = 1,
                 save_distributed_checkpoint: bool = True, process_group_backend: str | None = None):
        """
        Args:
            data_parallel_size: "world" (every process shards the networks) or an explicit size.
            tensor_parallel_size: 1 (no tensor parallelism: networks are sharded with FSDP2 only).
            save_distributed_checkpoint: sharded (DCP) checkpoints, one file per rank.
            process_group_backend: None picks nccl on GPUs and gloo on CPUs.
        """
        super().__init__(data_parallel_size=1, tensor_parallel_size=tensor_parallel_size,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend)
        self._requested_dp = data_parallel_size

    def setup_environment(self) -> None:
        world = self.num_nodes * self.num_processes
        dp = world // self._tensor_parallel_size if self._requested_dp == "world" else int(self._requested_dp)
        if dp * self._tensor_parallel_size != world:
            raise ValueError(f"data_parallel_size {dp} x tensor_parallel_size {self._tensor_parallel_size} "
                             f"!= world size {world} ({self.num_nodes} nodes x {self.num_processes} devices)")
        self._data_parallel_size = dp
        super().setup_environment()
