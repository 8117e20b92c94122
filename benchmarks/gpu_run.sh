#!/usr/bin/env bash
# One prepared GPU session (device tool): train the shapes-world model on the GPU and evaluate it,
# SD 1.5-size parity in fp32 and fp16, the component and pipeline benchmarks. Results land in $OUT.
set -u
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 TQDM_DISABLE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, diffusers, transformers; print(torch.__version__, diffusers.__version__, transformers.__version__)"
if [ "${SKIP_TRAIN:-0}" != 1 ]; then
  timeout 330 python3 -m minisd.train all --device cuda --work /tmp/run --out /tmp/run/model ${TRAIN_ARGS:-} 2>&1 | grep -v "it/s" | tail -40
  cp /tmp/run/log.txt "$OUT/train_log.txt"; cp /tmp/run/timings.json "$OUT/"; cp /tmp/run/unet_samples_final.png "$OUT/" 2>/dev/null
  timeout 120 python3 -m minisd.eval --model /tmp/run/model --device cuda --json "$OUT/adherence.json" ${EVAL_ARGS:-}
  python3 - <<'PY'
import os, tarfile, torch
from minisd import StableDiffusion
pipe = StableDiffusion.from_pretrained("/tmp/run/model", device="cpu", dtype=torch.float16)
pipe.save_pretrained("/tmp/ship")
out = os.environ.get("OUT", "/tmp/out")
os.replace("/tmp/ship/unet/diffusion_pytorch_model.safetensors", f"{out}/unet.safetensors")
with tarfile.open(f"{out}/tiny_rest.tar.gz", "w:gz") as t:
    t.add("/tmp/ship", arcname="tiny")
PY
fi
timeout 150 python3 benchmarks/parity_gpu.py 2>&1 | tee "$OUT/parity.md"
timeout 120 python3 benchmarks/components.py --device cuda --dtype float16 --size 512 --repeats 10 2>&1 | tee "$OUT/components.md"
timeout 200 python3 benchmarks/pipeline.py --model sd15 --device cuda --dtype float16 --size 512 --steps 50 25 --batch 1 4 --repeats 3 2>&1 | tee "$OUT/pipeline.md"
ls -la "$OUT"
