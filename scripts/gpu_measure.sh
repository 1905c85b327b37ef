#!/usr/bin/env bash
# The GPU measurements of issue 12, as one command on the device machine (see scripts/gpu_prepare.sh), each step
# under its own time limit so that one slow step cannot eat the others' time:
#   1. the measuring stick: ours vs nanoGPT vs Hugging Face training step, B16 x T1024, 124M model;
#   2. greedy decoding, batch 1 and 8: ours (CUDA graphs) vs Hugging Face generate;
#   3. 200 steps of the fast mode against the fp32 reference on real text.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=.:/tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
nvidia-smi --query-gpu=name,memory.total --format=csv
OUT=${OUT:-/tmp/out}
timeout 240 python3 .bench/train_compare.py --device cuda --batch-size 16 --seq-len 1024 2>&1 | tee $OUT/stick.log
timeout 120 python3 -m gpt2_demo.bench generate --device cuda --json > $OUT/generate.json 2> $OUT/generate.log
timeout 180 python3 -m gpt2_demo.bench track --device cuda --steps 200 --json > $OUT/track.json 2> $OUT/track.log
tail -n 3 $OUT/*.log
