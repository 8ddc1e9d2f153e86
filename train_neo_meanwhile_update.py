"""ICU on one device (GPU or CPU): iterative contrastive unlearning of a causal LM.

    python train_neo_meanwhile_update.py --exp exp0 --model_name EleutherAI/gpt-neo-125m \
        --tokenizer_name EleutherAI/gpt-neo-125m --gpt2_name gpt2 --bert_name bert-base-uncased \
        --device cuda:0 --batch_size 8 --lr 5e-6 --dir result/exp0
"""

from __future__ import annotations

from icu.cli import resolve_device
from icu.engine import TorchEngine
from icu.errors import exit_on_user_error
from icu.trainer import parse_args, run_training


@exit_on_user_error
def main(argv=None) -> None:
    args = parse_args(argv, distributed=False)
    device = resolve_device(args.device)
    run_training(args, lambda model: TorchEngine(model, args.lr, device), device)


if __name__ == "__main__":
    main()
