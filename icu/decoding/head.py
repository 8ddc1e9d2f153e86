"""The output layer applied tile by tile: per row, the argmax, the cross-entropy of a label, or
the top k and the log-sum-exp of ``head(hidden)``, without building the (rows, vocabulary)
logits. On a CPU the full logits of a teacher-forced pass over a 50257-token vocabulary cost a
large share of the pass for a small model, and on any device they are its memory peak; here a
tile's logits are folded into running results and dropped.

Ties follow ``torch.argmax`` / a row-wide ``topk``: the lowest token id wins.
"""

from __future__ import annotations

from typing import Optional

import torch


def _vocab_major(hidden: torch.Tensor) -> bool:
    """Whether to compute a tile's logits as (W @ h.T).T: on a CPU in fp32 with few rows (a
    decode step). There ``linear``'s GEMM time jumps erratically with the row count, while the
    transposed product stays flat (``bench/bench_output_layer.py`` measures both). The values
    agree with ``linear`` to float rounding (~1e-6), as ``linear`` itself does across batch
    shapes."""
    return hidden.device.type == "cpu" and hidden.dtype == torch.float32 and hidden.shape[0] <= 16


def _logits_tile(h: torch.Tensor, head: torch.nn.Linear, v0: int, vb: int, vocab_major: bool) -> torch.Tensor:
    """(rows, vb) logits of ``head`` for token ids v0..v0+vb-1, row-major either way."""
    w = head.weight[v0 : v0 + vb]
    b = None if head.bias is None else head.bias[v0 : v0 + vb]
    if vocab_major:
        t = torch.mm(w, h.t()) if b is None else torch.addmm(b[:, None], w, h.t())
        return t.t().contiguous()
    return torch.nn.functional.linear(h, w, b)


def _add_to_logsumexp(
    run_max: torch.Tensor, run_sum: torch.Tensor, logits: torch.Tensor, tile_max: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold a float32 tile (rows, vb) with row maxima ``tile_max`` into the running log-sum-exp
    (max, sum of exp(x - max)). Overwrites ``logits``: a second tile-sized buffer would cost more
    than the exp itself."""
    new_max = torch.maximum(run_max, tile_max)
    run_sum = run_sum * torch.exp(run_max - new_max) + logits.sub_(new_max[:, None]).exp_().sum(-1)
    return new_max, run_sum


def _argmax_tiles(N: int, V: int, device: torch.device) -> tuple[int, int]:
    """(rows, vocabulary slice) per tile for :func:`head_argmax` on ``device``."""
    if device.type == "cuda":  # memory is the only reason to tile on a GPU
        return max(1, (1 << 27) // V), V
    if N * V <= 1 << 21:  # a few rows (decode steps): one tile, fewer ops
        return max(1, N), V
    # 400 x 4096 fp32 logits (6.5 MB) stay in cache between the GEMM and the reductions
    return 400, 4096


def head_argmax(
    hidden: torch.Tensor,
    head: torch.nn.Linear,
    labels: Optional[torch.Tensor] = None,
    tiles: Optional[tuple[int, int]] = None,
    vocab_major: Optional[bool] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """argmax of ``head(hidden)`` per row (N,) and, with ``labels`` (N,), the cross-entropy
    -log softmax(logits)[label] (N,) (NaN where the label is -100), without building (N, V);
    ``tiles`` = (rows, vocabulary slice) overrides the device's tile shape; ``vocab_major``
    forces the logits' layout (default: see :func:`_vocab_major`).

    Ties go to the lowest token id, as ``torch.argmax`` (hence generate's greedy) does: each tile
    takes its first maximum, and a later tile must be strictly larger to win.
    """
    N = hidden.shape[0]
    dev = hidden.device
    vm = _vocab_major(hidden) if vocab_major is None else bool(vocab_major)
    rb, vb = _argmax_tiles(N, head.weight.shape[0], dev) if tiles is None else tiles
    preds = torch.empty(N, dtype=torch.long, device=dev)
    loss = None if labels is None else torch.empty(N, dtype=torch.float32, device=dev)
    for r0 in range(0, N, rb):
        lab = None if labels is None else labels[r0 : r0 + rb]
        arg, row_loss = _argmax_rows(hidden[r0 : r0 + rb], head, lab, vb, vm)
        preds[r0 : r0 + rb] = arg
        if labels is not None:
            loss[r0 : r0 + rb] = row_loss
    return preds, loss


def _argmax_rows(
    h: torch.Tensor, head: torch.nn.Linear, lab: Optional[torch.Tensor], vb: int, vm: bool
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """:func:`head_argmax` for one block of rows h (R, H), vocabulary tiles of ``vb``."""
    R, V, dev = h.shape[0], head.weight.shape[0], h.device
    best = torch.full((R,), float("-inf"), dtype=torch.float32, device=dev)
    arg = torch.zeros(R, dtype=torch.long, device=dev)
    nan = torch.zeros(R, dtype=torch.bool, device=dev)
    if lab is not None:
        run_max = torch.full((R,), float("-inf"), dtype=torch.float32, device=dev)
        run_sum = torch.zeros(R, dtype=torch.float32, device=dev)
        picked = torch.full((R,), float("nan"), dtype=torch.float32, device=dev)
    for v0 in range(0, V, vb):
        logits = _logits_tile(h, head, v0, vb, vm)
        # amax is vectorised and far cheaper than argmax on a CPU: take the argmax only of rows
        # whose maximum this tile raises (after the first tiles, few of them).
        val = logits.amax(-1).float()  # NaN if the row has one (argmax then points at it)
        nan |= torch.isnan(val)
        better = val > best
        if v0 == 0 or bool(better.all()):
            arg = torch.where(better, logits.argmax(-1) + v0, arg)
        elif bool(better.any()):
            rows = better.nonzero().squeeze(1)
            arg[rows] = logits[rows].argmax(-1) + v0
        best = torch.where(better, val, best)
        if lab is not None:
            lf = logits.float()
            inside = (lab >= v0) & (lab < v0 + logits.shape[1])
            if bool(inside.any()):
                rows = inside.nonzero().squeeze(1)
                picked[rows] = lf[rows, lab[rows] - v0]
            run_max, run_sum = _add_to_logsumexp(run_max, run_sum, lf, val)
        del logits
    if bool(nan.any()):  # torch.argmax returns a NaN's index: let it decide those rows
        rows = nan.nonzero().squeeze(1)
        arg[rows] = head(h[rows]).argmax(-1)
    return arg, (None if lab is None else run_max + torch.log(run_sum) - picked)


def top_candidates(
    hidden: torch.Tensor, head: torch.nn.Linear, k: int, vocab_major: Optional[bool] = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of ``head(hidden)``: the k largest logits (R, k) descending, their ids, and the
    log-sum-exp (R,), tile by tile without building (R, V). ``vocab_major``: the logits'
    layout (default: see :func:`_vocab_major`)."""
    V = head.weight.shape[0]
    R = hidden.shape[0]
    vm = _vocab_major(hidden) if vocab_major is None else bool(vocab_major)
    vb = V if hidden.device.type == "cuda" or R * V <= 1 << 21 else 4096
    top_v = torch.full((R, k), float("-inf"), dtype=torch.float32, device=hidden.device)
    top_i = torch.zeros((R, k), dtype=torch.long, device=hidden.device)
    run_max = torch.full((R,), float("-inf"), dtype=torch.float32, device=hidden.device)
    run_sum = torch.zeros(R, dtype=torch.float32, device=hidden.device)
    for v0 in range(0, V, vb):
        logits = _logits_tile(hidden, head, v0, vb, vm).float()
        tile_max = logits.amax(-1)  # vectorised, unlike max(dim) which also finds indices
        # A tile can only change the top k where it beats the current k-th value; after the
        # first tiles that is rare, and topk costs several times a max.
        rows = (tile_max > top_v[:, -1]).nonzero().squeeze(1)
        if rows.numel():
            tv, ti = logits[rows].topk(min(k, logits.shape[1]), dim=-1)
            # earlier tiles first: on equal values the lower token id stays, as in a row-wide topk
            cat_v = torch.cat([top_v[rows], tv], 1)
            cat_i = torch.cat([top_i[rows], ti + v0], 1)
            order = torch.sort(cat_v, dim=1, descending=True, stable=True).indices[:, :k]
            top_v[rows], top_i[rows] = cat_v.gather(1, order), cat_i.gather(1, order)
        run_max, run_sum = _add_to_logsumexp(run_max, run_sum, logits, tile_max)
        del logits
    return top_v, top_i, run_max + torch.log(run_sum)
