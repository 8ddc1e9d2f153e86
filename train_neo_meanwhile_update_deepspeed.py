"""ICU with DeepSpeed: data parallel over GPUs (and nodes), ZeRO 0-3, sharded validation.

    deepspeed --num_gpus 3 train_neo_meanwhile_update_deepspeed.py --exp exp0 \
        --model_name EleutherAI/gpt-neo-1.3B --batch_size 1 --lr 2e-6 \
        --deepspeed_config config/deepspeed3.json --dir result/exp0_1.3b

Same loop and flags as train_neo_meanwhile_update.py, without --device: rank r trains on
cuda:LOCAL_RANK (nccl), or on the CPU with DS_ACCELERATOR=cpu (gloo). --lr and --batch_size
override the JSON's optimizer lr and batch keys (icu/ds_config.py).
"""

from __future__ import annotations

import logging
import sys

from icu.console import setup_console
from icu.errors import EXIT_USAGE, IcuError
from icu.trainer import parse_args, run_training


def main(argv=None) -> None:
    setup_console()  # before deepspeed is imported: its log lines go to stderr
    args = parse_args(argv, distributed=True)
    from icu.ds_config import build_ds_config
    from icu.engine import (DeepSpeedEngine, agree_on_error, check_deepspeed_checkpoint,
                            init_deepspeed_distributed, shutdown_distributed)
    from icu.checkpoint import find_checkpoint

    rank, _, world, device = init_deepspeed_distributed(args.local_rank)
    ds, error = None, None
    try:  # every rank checks before anything is written; all agree on the outcome
        ds = build_ds_config(args.deepspeed_config, lr=args.lr, batch_size=args.batch_size, world_size=world,
                             on_cpu=device.type == "cpu", model_dtype=args.dtype)
        found = find_checkpoint(args.dir) if args.resume else None
        if found:  # the newest complete one (a kill in a save can leave it as checkpoint.tmp)
            check_deepspeed_checkpoint(found[0], world)
    except IcuError as exc:
        error = str(exc)
    error = agree_on_error(error, world)
    if error is None:
        def make_engine(model):
            for note in ds.notes if rank == 0 else ():
                logging.getLogger("icu").warning(note)  # after set-up, so res.log has them
            return DeepSpeedEngine(model, ds.config)

        try:
            run_training(args, make_engine, device, rank, engine_name="deepspeed",
                         extra_info={"deepspeed_config": ds.config, "zero_stage": ds.zero_stage})
        except IcuError as exc:  # raised on every rank alike (same files, same flags)
            error = str(exc)
        except SystemExit:  # a non-finite loss stops every rank together (exit 1)
            shutdown_distributed(barrier=True)
            raise
    shutdown_distributed(barrier=True)
    if error:
        if rank == 0:  # one message; every rank exits non-zero
            print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USAGE)


if __name__ == "__main__":
    main()
