"""Sentence embeddings and exact nearest neighbours: the retain ("learn") set builder.

data_prep pairs every forget target with the candidate row whose embedding is closest (exact L2,
as the reference's flat index). Embeddings come from a sentence-transformers model
(all-MiniLM-L6-v2 by default, unit-normalised 384-d vectors).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .console import bar_disabled


def embed_texts(
    texts: Sequence[str], model_path: str, device: str = "cpu", batch_size: int = 64
) -> np.ndarray:
    """(len(texts), dim) float32 embeddings, with a progress bar on a terminal."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(model_path, device=device)
    emb = model.encode(
        list(texts),
        batch_size=batch_size,
        show_progress_bar=not bar_disabled(),  # in a log it would be thousands of redraws on one line
        convert_to_numpy=True,
    )
    return np.asarray(emb, dtype=np.float32)


# Distances closer than this count as a tie. The corpus holds exact duplicate documents (e.g. the
# same VPN config several times); their embeddings differ only by float noise (~1e-7, and it
# changes with batch size and device), so without a tolerance the order among duplicates, and
# hence which row becomes the learn row, would depend on --batch_size. 1e-5 is far above that
# noise and far below the gaps between distinct texts' distances near the top of a ranking.
TIE_TOLERANCE = 1e-5


def nearest_neighbors(
    queries: np.ndarray, pool: np.ndarray, k: int, tie_tolerance: float = TIE_TOLERANCE
) -> np.ndarray:
    """(len(queries), k) indices into ``pool`` of the exact L2 nearest neighbours, closest first.

    Ties (runs of sorted distances whose neighbouring gaps are below ``tie_tolerance``) are
    ordered by ascending pool index, so the result does not depend on float noise.
    """
    if k > len(pool):
        raise ValueError(f"k={k} is larger than the candidate pool ({len(pool)} rows)")
    from sklearn.metrics.pairwise import euclidean_distances

    pool64 = np.asarray(pool, dtype=np.float64)
    out = np.empty((len(queries), k), dtype=np.int64)
    chunk = 256  # bounds the distance matrix to 256 x len(pool) float64
    for s in range(0, len(queries), chunk):
        # Exact search over every candidate (the reference's flat L2 index), in float64.
        d = euclidean_distances(np.asarray(queries[s:s + chunk], dtype=np.float64), pool64)
        order = np.argsort(d, axis=1, kind="stable")
        for r in range(len(d)):
            out[s + r] = _tie_ordered_head(d[r], order[r], k, tie_tolerance)
    return out


def _tie_ordered_head(dist: np.ndarray, order: np.ndarray, k: int, tol: float) -> np.ndarray:
    """The first k of ``order`` after re-sorting each run of tied distances by index."""
    sd = dist[order]
    end = k
    # Extend the head until the tie group holding position k-1 is complete.
    while end < len(order) and sd[end] - sd[end - 1] < tol:
        end += 1
    head, hd = order[:end], sd[:end]
    group = np.concatenate([[0], np.cumsum(np.diff(hd) >= tol)])
    return head[np.lexsort((head, group))][:k]
