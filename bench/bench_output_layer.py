"""Time the tiled output layer's two layouts on a CPU: ``linear`` (rows x vocabulary) against the
transposed product (W @ h.T).T that :func:`icu.decoding.head._vocab_major` picks for fp32 tiles
of up to 16 rows (decode steps), and the full head against :func:`head_argmax`.

Why the switch exists (measured on 2 idle cores, fp32, a 50257 x 128 head): ``linear``'s GEMM
took 10-17 ms for 2, 3, 6, 7 or 11 rows but 5-6 ms for 4 or 8, while the transposed product took
3-7 ms for every row count; from 24 rows up it gained nothing. Rerun this script to check the
rule on another machine. The two layouts agree to float rounding (~1e-6); the script prints the
largest difference too.

    python bench/bench_output_layer.py                        # rows 1..16, 24, 32
    python bench/bench_output_layer.py --hidden 768 --threads 2 --repeats 50
"""

from __future__ import annotations

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402

from icu.decoding.head import _logits_tile, head_argmax  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--rows", default="1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,24,32",
                   help="comma list of row counts")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per row count (median)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    return p.parse_args(argv)


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return 1000 * times[len(times) // 2]


@torch.no_grad()
def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    head = torch.nn.Linear(args.hidden, args.vocab, bias=False)
    V = args.vocab
    print(f"head {V} x {args.hidden}, fp32, {torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"{'rows':>5} {'linear ms':>10} {'transposed ms':>14} {'full argmax ms':>15} "
          f"{'head_argmax ms':>15} {'max|diff|':>10}")
    for R in (int(r) for r in args.rows.split(",")):
        h = torch.randn(R, args.hidden)
        lin = median_ms(lambda: _logits_tile(h, head, 0, V, False), args.repeats)
        tr = median_ms(lambda: _logits_tile(h, head, 0, V, True), args.repeats)
        full = median_ms(lambda: head(h).argmax(-1), args.repeats)
        tiled = median_ms(lambda: head_argmax(h, head), args.repeats)
        diff = float((_logits_tile(h, head, 0, V, False) - _logits_tile(h, head, 0, V, True)).abs().max())
        print(f"{R:>5} {lin:>10.2f} {tr:>14.2f} {full:>15.2f} {tiled:>15.2f} {diff:>10.2g}", flush=True)


if __name__ == "__main__":
    main()
