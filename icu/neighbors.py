"""Sentence embeddings and exact nearest neighbours: the retain ("learn") set builder.

data_prep pairs every forget target with the candidate row whose embedding is closest (exact L2,
as the reference's flat index). Embeddings come from a sentence-transformers model
(all-MiniLM-L6-v2 by default, unit-normalised 384-d vectors).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def embed_texts(
    texts: Sequence[str], model_path: str, device: str = "cpu", batch_size: int = 64
) -> np.ndarray:
    """(len(texts), dim) float32 embeddings, with a progress bar."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(model_path, device=device)
    emb = model.encode(
        list(texts),
        batch_size=batch_size,
        show_progress_bar=True,
        convert_to_numpy=True,
    )
    return np.asarray(emb, dtype=np.float32)


def nearest_neighbors(queries: np.ndarray, pool: np.ndarray, k: int) -> np.ndarray:
    """(len(queries), k) indices into ``pool`` of the exact L2 nearest neighbours, closest first.

    """
    if k > len(pool):
        raise ValueError(f"k={k} is larger than the candidate pool ({len(pool)} rows)")
    from sklearn.neighbors import NearestNeighbors

    # Brute force = exact search, the same answer as the reference's flat L2 index.
    index = NearestNeighbors(n_neighbors=k, algorithm="brute", metric="euclidean").fit(pool)
    _, idx = index.kneighbors(queries, return_distance=True)
    return idx.astype(np.int64)
