#!/usr/bin/env bash
# GPU sweep (session 6): U-Net schedule / two-object share variants on the cpu3 VAE+CLIP, star LoRA variants.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TQDM_DISABLE=1 OMP_NUM_THREADS=2
nvidia-smi --query-gpu=name,memory.total --format=csv > $OUT/gpu.txt
unet() {  # name, flags...
  local n=$1; shift
  mkdir -p /tmp/$n && cp -r runs/gpuseed/* /tmp/$n/
  ( timeout 430 python -m minisd.train unet --device cuda --work /tmp/$n --out /tmp/$n/model "$@" > $OUT/$n.train.txt 2>&1
    cp /tmp/$n/log.txt $OUT/$n.log.txt
    timeout 60 python -m minisd.eval --model /tmp/$n/model --device cuda --cfg 7.5 1 --json $OUT/$n.eval.json > $OUT/$n.eval.txt 2>&1
    timeout 40 python -m minisd.eval --model /tmp/$n/model --device cuda --breakdown > $OUT/$n.breakdown.txt 2>&1
    cp /tmp/$n/unet_samples_final.png $OUT/$n.png 2>/dev/null ) &
}
lora() {
  local n=$1; shift
  ( timeout 300 python -m minisd.train lora --device cuda --work /tmp/$n --out /tmp/$n/out "$@" > $OUT/$n.train.txt 2>&1
    timeout 80 python -m minisd.eval --lora /tmp/$n/out --device cuda --json $OUT/$n.eval.json > $OUT/$n.eval.txt 2>&1 ) &
}
unet A
unet B --unet-steps 2500 --unet-refine-steps 1000
unet C --unet-steps 2500 --unet-refine-steps 1000 --unet-two-share 0.7
unet D --unet-two-share 0.7
lora L1 --steps 1600
lora L2 --steps 1600 --rank 32 --alpha 32
sleep 60; nvidia-smi > $OUT/smi.txt; 
wait
ls $OUT
