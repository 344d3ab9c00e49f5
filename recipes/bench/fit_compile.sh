set -x
# torch.compile under `vidistill fit` (docs/benchmarks.md, "compile under fit"): the 2b edge control
# recipe (FSDP2, fp32 master weights, bf16 compute, `checkpointing: attention`, EMA, AdamW) run twice
# with the same seed and data, eager then `sharding.compile: true`, on GPUS GPUs, over shape-only
# latent shards (recipes/bench/fit-latent.yaml); then both runs' per-step losses side by side.
# Run: GPUS=2 SHAPE=16x24x60x104 bash recipes/bench/fit_compile.sh   (results land in $OUT)
# EXTRA takes more fit arguments, e.g. a CPU smoke run: SHAPE=16x3x8x8 TEXT=16x32 EXTRA="--model.init_args.net.preset
# tiny --trainer.accelerator cpu --model.init_args.options.sharding.param_dtype float32"
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/fitbench}; GPUS=${GPUS:-1}; STEPS=${STEPS:-16}; SHAPE=${SHAPE:-16x24x60x104}  # 480p x 93 f
TEXT=${TEXT:-512x1024}
mkdir -p $OUT
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
[ -d $OUT/lat-$SHAPE ] || python3 -m tools.cli make-shards --synthetic latent --out $OUT/lat-$SHAPE \
    --latent_shape $SHAPE --text_shape $TEXT --num_samples 32 --samples_per_shard 4 --controls edge --progress false
for c in false true; do
  run=$OUT/gpus$GPUS-$SHAPE-compile-$c
  torchrun --standalone --nproc_per_node $GPUS -m tools.cli fit --config recipes/transfer2.5-2b/edge/control.yaml \
      --config recipes/bench/fit-latent.yaml --trainer.devices $GPUS --trainer.max_steps $STEPS \
      --data.init_args.train_shards $OUT/lat-$SHAPE --model.init_args.options.sharding.compile $c \
      --trainer.default_root_dir $run --trainer.logger.init_args.save_dir $run $EXTRA 2>&1 | grep -v Warning | tail -25
done
python3 - "$OUT" "$GPUS" "$SHAPE" <<'PY'
import glob, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
out, gpus, shape = sys.argv[1:]
loss = {}
for c in ("false", "true"):
    files = sorted(glob.glob(f"{out}/gpus{gpus}-{shape}-compile-{c}/**/events.out.tfevents*", recursive=True))
    ev = EventAccumulator(files[-1]); ev.Reload()
    loss[c] = {e.step: e.value for e in ev.Scalars("train/loss")}
print("step | eager loss | compiled loss | relative difference")
for s in sorted(loss["false"]):
    a, b = loss["false"][s], loss["true"].get(s, float("nan"))
    print(f"{s} | {a:.5f} | {b:.5f} | {abs(a - b) / abs(a):.2e}")
PY
