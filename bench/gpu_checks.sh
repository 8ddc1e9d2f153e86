#!/usr/bin/env bash
# Every GPU check of the project in one run (a lent CUDA machine has only torch/transformers):
#   1. forget-set evaluation, reference algorithm vs ours, GPT-Neo-125M-shaped model, bf16 + fp32
#   2. one ICU epoch + validation of a 125M-shaped model that first memorized the toy targets
#   3. one training epoch with the single-device engine vs the DeepSpeed engine (1 GPU)
#   4. the paper's regime in short (config/compare_paper.yaml: lr 5e-6, batch 8, EL only where
#      needed) through compare.py on the toy world: original, ga, icu, 2 seeds, 3 epochs
# Wheels for the missing packages can be carried in .gpu/wheels (pip download / pip wheel on a
# CPU box), and an offline BERTScore model in .gpu/minilm. Results land in $OUT (default bench/out).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
if [ -d .gpu/wheels ]; then
    python3 -m pip install -q --no-deps --no-index .gpu/wheels/*.whl 2>&1 | tail -2
fi
BERT=builtin:all-MiniLM-L6-v2
[ -d .gpu/minilm ] && BERT=.gpu/minilm
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"

step() {  # step NAME SECONDS CMD...: run with a time limit, log to $OUT/NAME.log
    local name=$1 limit=$2; shift 2
    echo "=== $name"
    timeout "$limit" "$@" 2>&1 | grep -vE "it/s\]|s/it\]|Writing model shards" | tee "/tmp/icu-$name.log" | tail -25
}

step forget_eval_bf16 110 python3 bench/bench_forget_eval.py --model neo125m --device cuda --dtype bf16 --parts ${PARTS:-ma,el,whole} \
    --batch_size 8 --num_samples 32 --bert_name "$BERT" --out "$OUT/forget_eval_bf16.json"
[ -n "${SKIP_FP32:-}" ] || step forget_eval_fp32 120 python3 bench/bench_forget_eval.py --model neo125m --device cuda --dtype fp32 --parts ${PARTS:-ma,el,whole} \
    --batch_size 8 --num_samples 32 --bert_name "$BERT" --out "$OUT/forget_eval_fp32.json"
step icu_epoch 120 python3 bench/bench_icu_epoch.py --device cuda --bert_name "$BERT" --out "$OUT/icu_epoch.json"
step ds_epoch 80 python3 bench/bench_deepspeed_epoch.py --data_dir datasets/toy/exp --exp exp0 ${DS_CONFIG:+--deepspeed_config $DS_CONFIG} --out "$OUT/ds_epoch.json"
python3 -c "import yaml; c = yaml.safe_load(open('config/compare_paper.yaml')); c['common']['max_epochs'] = 3; yaml.safe_dump(c, open('/tmp/icu-paper-short.yaml', 'w'))"
step paper_short 240 python3 compare.py --exp exp0 --data_dir datasets/toy/exp --model_name datasets/toy/model \
    --gpt2_name builtin:gpt2 --bert_name "$BERT" --device cuda --batch_size 8 --eval_batch_size 32 \
    --methods original,ga,icu --seeds 0,1 --baseline ga --config /tmp/icu-paper-short.yaml \
    --dir "$OUT/paper_short"
cp /tmp/icu-paper-short.yaml "$OUT/" 2>/dev/null
echo "=== done"
