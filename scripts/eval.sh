#!/usr/bin/env bash
# Evaluate a model (the original or an unlearned one) on a split's forget set.
#   MODEL=result/neo125m_exp0/EleutherAI/gpt-neo-125m_exp0_..._updateboth bash scripts/eval.sh
set -euo pipefail
cd "$(dirname "$0")/.."
EXP=${EXP:-exp0}
MODEL=${MODEL:-EleutherAI/gpt-neo-125m}
python eval.py \
    --exp "$EXP" \
    --model_name "$MODEL" \
    --tokenizer_name EleutherAI/gpt-neo-125m \
    --gpt2_name gpt2 \
    --bert_name bert-base-uncased \
    --prefix_length 200 --suffix_length 200 --target_length 200 \
    --device cuda:0 --batch_size 8 --num_workers 8 \
    --dir "${DIR:-result/eval_${EXP}}" "$@"
