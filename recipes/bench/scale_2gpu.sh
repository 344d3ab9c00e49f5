set -x
# Two-GPU scaling benchmark (docs/benchmarks.md, "Two GPUs"): first context parallelism against one
# GPU in bf16 at the 2b shape (outputs, tapped features and gradients; plain and under FSDP2), then
# `bench --mode scale`: FSDP2 data-parallel control training and DMD2 turns against one GPU, a
# context-parallel (cp 2) 720p x 93-frame training step and inference per step against one GPU.
# Run: bash recipes/bench/scale_2gpu.sh   (results land in $OUT, default /tmp/scale)
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/scale}; mkdir -p $OUT
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
torchrun --standalone --nproc_per_node 2 -m tests.helpers.cp_worker --device cuda --preset 2b --hw 44x80 \
    --frames 8,7 --out $OUT/cp_check.json
cat $OUT/cp_check.json; echo
torchrun --standalone --nproc_per_node 2 -m tools.cli bench --mode scale --preset 2b --shapes 720p_93f \
    --dmd2_shapes 480p_93f --steps 1 --checkpointing attention --dmd2_checkpointing full --profile $OUT/prof
