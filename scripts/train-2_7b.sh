#!/usr/bin/env bash
# The paper's GPT-Neo 2.7B run: 6 GPUs, DeepSpeed ZeRO-2, bf16, optimizer state on the CPU
# (config/deepspeed6.json: train_batch_size 6 = 6 GPUs x micro batch 1).
#
#   bash scripts/train-2_7b.sh [EXP] [extra flags...]      e.g.  bash scripts/train-2_7b.sh exp0 --resume
#
# --lr 2e-6 is the learning rate the reference's DeepSpeed runs actually used (it took the JSON's
# lr and ignored --lr); here --lr is the only source. Build the split first with data_prep.py.
set -euo pipefail
cd "$(dirname "$0")/.."
EXP="${1:-exp0}"
shift || true
MODEL="${MODEL:-EleutherAI/gpt-neo-2.7B}"
deepspeed --num_gpus 6 train_neo_meanwhile_update_deepspeed.py \
    --exp "$EXP" \
    --model_name "$MODEL" --tokenizer_name "$MODEL" \
    --gpt2_name gpt2 --bert_name bert-base-uncased \
    --batch_size 1 --eval_batch_size 8 --lr 2e-6 \
    --uw 1.0 --lw 0.5 --kl 1.0 \
    --deepspeed_config config/deepspeed6.json \
    --dir "result/neo2.7b_${EXP}" \
    "$@"
