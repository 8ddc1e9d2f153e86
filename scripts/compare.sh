#!/usr/bin/env bash
# The demo's second act: unlearning methods side by side on the offline toy world, CPU only.
# original (untouched), ga (gradient ascent), npo and icu by default; set
# ICU_COMPARE_METHODS=original,ga,kl,llmu,po,npo,simnpo,icu for all of them.
#
# Toy settings, all in the open:
#   per-method lr / weights / max_epochs 15 / batch 8   config/compare_toy.yaml
#   stop thresholds MA <= 0.5994 and EL10 <= 0.0499       the paper's (config/compare.yaml)
#   held-out rows: the first 256 of datasets/toy/heldout_ids.npy (rows no method trains on)
# A killed run resumes where it stopped: run the script again.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
TOY=${ICU_TOY_DIR:-datasets/toy}
OUT=${ICU_COMPARE_DIR:-result/compare_toy}
METHODS=${ICU_COMPARE_METHODS:-original,ga,npo,icu}
OFFLINE=(--gpt2_name builtin:gpt2 --bert_name builtin:all-MiniLM-L6-v2)

echo "== 1/3 toy world and its split"
[ -d "$TOY/model" ] || python -m icu.toy --out "$TOY"
# The demo's split when it exists; otherwise data_prep writes one into a scratch copy under
# result/ (the toy folder itself is left as it is).
SPLIT=${ICU_COMPARE_SPLIT:-$TOY/exp}
if [ ! -f "$SPLIT/exp0/learn/_dataset.npy" ]; then
    SPLIT=result/toy_split
    if [ ! -f "$SPLIT/exp0/learn/_dataset.npy" ]; then
        mkdir -p "$SPLIT" && cp -r "$TOY/exp/." "$SPLIT/"
        python data_prep.py --train_file "$TOY/train_dataset.npy" --exp_dir "$SPLIT" --exps exp0 \
            --embedder builtin:all-MiniLM-L6-v2 --gpt2_name builtin:gpt2
    fi
fi

echo "== 2/3 held-out rows"
mkdir -p "$OUT"
python -c "import numpy as np, sys; t = sys.argv[1]; np.save(sys.argv[2], \
np.load(t + '/train_dataset.npy')[np.load(t + '/heldout_ids.npy')[:256]])" "$TOY" "$OUT/heldout256.npy"

echo "== 3/3 compare $METHODS"
python compare.py --exp exp0 --data_dir "$SPLIT" --model_name "$TOY/model" "${OFFLINE[@]}" \
    --device cpu --batch_size 8 --eval_batch_size 16 --methods "$METHODS" \
    --config config/compare_toy.yaml --heldout "$OUT/heldout256.npy" --dir "$OUT"
