#!/usr/bin/env bash
# The paper's GPT-Neo 125M run on one GPU (split exp0; repeat for exp1..exp4).
set -euo pipefail
cd "$(dirname "$0")/.."
EXP=${EXP:-exp0}
python train_neo_meanwhile_update.py \
    --exp "$EXP" \
    --model_name EleutherAI/gpt-neo-125m \
    --tokenizer_name EleutherAI/gpt-neo-125m \
    --gpt2_name gpt2 \
    --bert_name bert-base-uncased \
    --prefix_length 200 --suffix_length 200 --target_length 200 \
    --device cuda:0 --batch_size 8 --num_workers 8 \
    --lr 5e-6 --uw 1.0 --lw 0.5 --kl 1.0 \
    --f1 0.3 --bleu 0.01 --acc 0.5994 --el 0.0499 \
    --dir "result/neo125m_${EXP}" "$@"
