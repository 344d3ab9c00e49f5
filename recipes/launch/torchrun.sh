#!/bin/bash
# Single- or multi-node training with torchrun (TorchElastic): Lightning detects the environment.
# Usage (one node, 8 GPUs):   recipes/launch/torchrun.sh recipes/transfer2.5-2b/edge/control.yaml
# Multi-node: run on every node with NNODES, NODE_RANK, MASTER_ADDR (and MASTER_PORT) set; node 0
# hosts the rendezvous (static, at MASTER_ADDR:MASTER_PORT). A killed node stops the run; restart
# every node with --ckpt_path last to resume (tests/test_launch.py does this with two CPU "nodes").
set -euo pipefail
RECIPE=${1:?usage: torchrun.sh RECIPE [extra vidistill fit arguments]}
shift
NPROC=${NPROC:-$(python -c 'import torch; print(max(1, torch.cuda.device_count()))')}
NNODES=${NNODES:-1}
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
# --no-python runs the vidistill console script as it is (a pyenv or conda shim is no Python file)
exec torchrun --nnodes "$NNODES" --node_rank "${NODE_RANK:-0}" --nproc_per_node "$NPROC" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
  --no-python vidistill fit --config "$RECIPE" \
  --trainer.num_nodes "$NNODES" --trainer.devices "$NPROC" "$@"
