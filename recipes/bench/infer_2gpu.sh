set -x
# Inference benchmark on 2 GPUs (random 2b edge network, random full-size Wan2.1 VAE, 4-step student
# sampler, 480p): long video with and without --reuse-latents, then a 6-spec batch with --placement
# against torchrun data parallelism. Needs diffusers. Run: bash recipes/bench/infer_2gpu.sh
cd "$(dirname "$0")/../.."
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
W=/tmp/w; mkdir -p $W
python3 - <<'PY'
import json, numpy as np, torch
from dataclasses import asdict
from diffusers import AutoencoderKLWan
from modules.denoiser import Denoiser
from modules.nets import preset
from modules.pipeline import GenerationSettings
from modules.sampling import SamplerConfig
from datamodules.codec import write_video
W = "/tmp/w"
AutoencoderKLWan().save_pretrained(f"{W}/vae")   # random full-size Wan2.1 VAE
cfg = preset("2b", text_proj_in=None, text_dim=32, latent_channels=16)
cfg.modalities = ["edge"]; cfg.control.channels = max(cfg.control.channels, 16)
Denoiser.build(cfg, device="cuda", dtype=torch.bfloat16).save_pretrained(f"{W}/model")
GenerationSettings(tokenizer={"kind": "wan2.1", "path": f"{W}/vae", "options": {"dtype": "bfloat16"}},
                   text={"encoder": "tiny", "max_length": 512},
                   sampler=asdict(SamplerConfig(sampler="student", t_list=(1.0, .75, .5, .25), shift=5.0))).save(f"{W}/model")
T, H, Wd = 185, 480, 832
v = np.full((T, H, Wd, 3), 60, np.uint8)
for t in range(T):
    v[t, 100:300, 50 + 3 * t: 250 + 3 * t] = (200, 120, 40)
write_video(f"{W}/long.mp4", v, 16.0)
write_video(f"{W}/short.mp4", v[:93], 16.0)
base = {"prompt": "an orange box slides over a grey floor", "resolution": "480", "num_conditional_frames": 1,
        "num_steps": 4, "edge": {}}
open(f"{W}/long.jsonl", "w").write("\n".join(json.dumps(dict(base, name=n, video_path="long.mp4")) for n in ("warm", "long")))
open(f"{W}/batch.jsonl", "w").write("\n".join(json.dumps(dict(base, name=f"b{i}", video_path="short.mp4", seed=i)) for i in range(6)))
print("setup done", flush=True)
PY
M=$W/model
for mode in "" "--reuse-latents"; do
  timeout 150 python3 -m tools.cli infer -i $W/long.jsonl -o $W/out$mode --model $M --disable-guardrails $mode 2>&1 | grep -E "infer:|Error|error" 
  python3 -c "import json,sys; i=json.load(open('$W/out$mode/long.json')); print('LONG $mode', i['frames'], i['chunks'], {k: round(v,2) for k,v in i['seconds'].items()})"
done
timeout 150 python3 -m tools.cli infer -i $W/batch.jsonl -o $W/place --model $M --disable-guardrails --placement cuda:0,cuda:1 2>&1 | grep -E "infer:|Error|error"
timeout 150 torchrun --nproc_per_node 2 -m tools.cli infer -i $W/batch.jsonl -o $W/dp --model $M --disable-guardrails 2>&1 | grep -E "infer:|Error|error"
python3 -c "import json; i=json.load(open('$W/dp/b3.json')); print('DP spec', {k: round(v,2) for k,v in i['seconds'].items()})"
python3 -c "import json; i=json.load(open('$W/place/b3.json')); print('PLACED spec', {k: round(v,2) for k,v in i['seconds'].items()})"
