#!/usr/bin/env bash
# The whole ICU pipeline on the offline toy world, CPU only (10-15 minutes on 2 idle cores,
# plus ~2-3 minutes the first time to build the toy world):
# toy world -> data_prep -> eval of the original -> thresholds calibrated on held-out rows ->
# ICU (stopping on those thresholds) -> eval of the unlearned -> table.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
TOY=${ICU_TOY_DIR:-datasets/toy}
OUT=${ICU_DEMO_DIR:-result/demo}
OFFLINE=(--gpt2_name builtin:gpt2 --bert_name builtin:all-MiniLM-L6-v2)

echo "== 1/6 toy world"
python -m icu.toy --out "$TOY"

echo "== 2/6 data_prep (forget set + nearest-neighbour learn set)"
python data_prep.py --train_file "$TOY/train_dataset.npy" --exp_dir "$TOY/exp" --exps exp0 \
    --embedder builtin:all-MiniLM-L6-v2 --gpt2_name builtin:gpt2

echo "== 3/6 eval of the original model"
python eval.py --exp exp0 --data_dir "$TOY/exp" --model_name "$TOY/model" "${OFFLINE[@]}" \
    --device cpu --batch_size 16 --dir "$OUT/before"

echo "== 4/6 thresholds: MA / EL / F1 / BLEU of the original model on held-out rows it never saw"
python eval.py --calibrate --unseen_rows "$TOY/heldout_ids.npy" --train_file "$TOY/train_dataset.npy" \
    --limit "${ICU_DEMO_CALIBRATE_ROWS:-64}" --exp exp0 --data_dir "$TOY/exp" --model_name "$TOY/model" \
    "${OFFLINE[@]}" --device cpu --batch_size 16 --dir "$OUT/thresholds"

echo "== 5/6 ICU (stop and flag rules from $OUT/thresholds/thresholds.json)"
python train_neo_meanwhile_update.py --exp exp0 --data_dir "$TOY/exp" --model_name "$TOY/model" \
    "${OFFLINE[@]}" --device cpu --batch_size 8 --eval_batch_size 16 \
    --thresholds "$OUT/thresholds/thresholds.json" \
    --lr "${ICU_DEMO_LR:-3e-4}" --lw 1.0 --kl 3.0 --max_epochs 15 --dir "$OUT/train" --overwrite

MODEL=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['model_dir'])" "$OUT/train/run.json")
echo "== 6/6 eval of the unlearned model ($MODEL)"
python eval.py --exp exp0 --data_dir "$TOY/exp" --model_name "$MODEL" "${OFFLINE[@]}" \
    --device cpu --batch_size 16 --dir "$OUT/after"

python -m icu.demo --toy "$TOY" --before "$OUT/before" --after "$OUT/after" --run "$OUT/train"
