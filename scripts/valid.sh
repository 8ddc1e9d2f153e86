#!/usr/bin/env bash
# Downstream ability (15 tasks) of a model after unlearning.
#   MODEL=path/to/unlearned bash scripts/valid.sh
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-EleutherAI/gpt-neo-125m}
python valid.py \
    --model_name "$MODEL" \
    --tokenizer_name EleutherAI/gpt-neo-125m \
    --prefix_length 512 --suffix_length 512 \
    --device cuda:0 --batch_size 32 --num_workers 8 \
    --dir "${DIR:-result/valid}" "$@"
