#!/usr/bin/env bash
# Issue 34's GPU check, one script for a lent CUDA machine (about 10 minutes on one H100):
#   - bf16 eval throughput (patches/s of 2 x 96^3 at the best batch) of veloxseg_small and veloxseg_small_hr;
#   - the trainer's step with bf16 AMP (benchmarks/gpu_train.py: 96^3, batch 2) for both;
#   - the default-recipe step of veloxseg_small_hr against MONAI's UNet (benchmarks/accuracy.py, 64^3, fp32,
#     100 steps, CUDA-synchronised step times in its table) on the demo data.
# Results go to $OUT (default benchmarks/results/gpu); commit them with the card's name.
#   OUT=/tmp/gpu bash benchmarks/gpu_check.sh
set -euo pipefail
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$(pwd)
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/device.txt"
python benchmarks/gpu_throughput.py --variants veloxseg_small veloxseg_small_hr --dtypes bf16 --max-batch 512 \
    --out "$OUT/gpu_throughput"
for model in veloxseg_small veloxseg_small_hr; do
    python benchmarks/gpu_train.py --model "$model" --max-steps 100 --mixed-precision bf16 \
        --output-dir "$OUT/runs/$model" --results "$OUT/train_speed-$model.md"
done
python benchmarks/accuracy.py --models veloxseg_small_hr UNet --steps 100 --out "$OUT/accuracy-demo-100steps"
rm -rf "$OUT/runs"  # checkpoints: not results
