"""The project's own EPITOME classifiers and the DIFF-EPITOME metric (EmPO's headline metric).

EPITOME (Sharma et al. 2020) rates a response to a seeker's post on three communication mechanisms, each at
level 0 (none), 1 (weak) or 2 (strong): emotional reactions (ER), interpretations (IP), explorations (EX).
DIFF-EPITOME (Lee et al. 2022, used by EmPO) compares the levels of a model's reply with those of the
reference reply to the same context: per dimension the mean |level(context, reply) - level(context, reference)|.

Lee et al. use Sharma et al.'s fine-tuned RoBERTa bi-encoders, which cannot be fetched here. These are the
project's own, CPU-cheap classifiers: frozen MiniLM sentence embeddings of the seeker post and the response
(both unit vectors; features [seeker, response, seeker * response]) and one multinomial logistic regression per
dimension, trained on the EPITOME Reddit splits. Their levels, and so DIFF-EPITOME values, are not comparable
with published numbers; the manifest records each dimension's test macro-F1. Only the weights are stored
(an ``.npz`` of arrays, no pickle), never the data, which may not be redistributed.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "DEFAULT_EPITOME_DIR",
    "DIMENSIONS",
    "MANIFEST_FILE",
    "MODEL_FILE",
    "TRAIN_COMMAND",
    "EpitomeClassifiers",
    "EpitomeData",
    "diff_epitome",
    "features",
    "load_epitome",
    "read_epitome_split",
    "train_epitome",
    "unavailable",
]

Embed = Callable[[Sequence[str]], npt.NDArray[Any]]

DIMENSIONS = ("er", "ip", "ex")
COLUMNS = {"er": "ER_level", "ip": "IP_level", "ex": "EX_level"}
SPLITS = ("train", "val", "test")
LEVELS = (0, 1, 2)
REGULARISATION = (0.1, 1.0, 10.0)  # Logistic regression's C, chosen per dimension by validation macro-F1.
MODEL_FILE = "epitome-classifiers.npz"
MANIFEST_FILE = "manifest.json"
DEFAULT_EPITOME_DIR = Path("trainer/epitome")  # Under the artefacts folder.
TRAIN_COMMAND = "emili eval train-epitome --data DIR"
NOTE = "EMILI's own EPITOME classifiers (MiniLM + logistic regression), not Sharma et al.'s / Lee et al.'s checkpoints"


@dataclass(frozen=True)
class EpitomeData:
    """One split: seeker posts, responses and, per dimension, the annotated levels."""

    seekers: list[str]
    responses: list[str]
    levels: dict[str, npt.NDArray[np.int64]]
    sha256: str


def read_epitome_split(path: Path) -> EpitomeData:
    """A split CSV (columns seeker_post, response_post, ER_level, IP_level, EX_level; others ignored)."""
    data = path.read_bytes()
    rows = list(csv.DictReader(data.decode("utf-8-sig").splitlines()))
    needed = {"seeker_post", "response_post", *COLUMNS.values()}
    if not rows or not needed <= set(rows[0]):
        raise ValueError(f"{path}: expected the columns {', '.join(sorted(needed))}")
    levels = {}
    for dimension, column in COLUMNS.items():
        values = np.array([int(float(row[column])) for row in rows], dtype=np.int64)
        if not np.isin(values, LEVELS).all():
            raise ValueError(f"{path}: {column} must be 0, 1 or 2")
        levels[dimension] = values
    return EpitomeData(
        seekers=[row["seeker_post"] for row in rows],
        responses=[row["response_post"] for row in rows],
        levels=levels,
        sha256=hashlib.sha256(data).hexdigest(),
    )


def features(seekers: npt.NDArray[Any], responses: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
    """[seeker, response, seeker * response] per row: the product lets a linear model see how the two relate."""
    s = np.asarray(seekers, dtype=np.float64)
    r = np.asarray(responses, dtype=np.float64)
    return np.hstack([s, r, s * r])


@dataclass(frozen=True)
class EpitomeClassifiers:
    """Per dimension, a linear model's weights (levels x features) and biases; ``encoder`` names the embedder."""

    encoder: str
    weights: Mapping[str, npt.NDArray[np.float64]]
    biases: Mapping[str, npt.NDArray[np.float64]]
    manifest: Mapping[str, Any]

    def predict(self, x: npt.NDArray[np.float64]) -> dict[str, npt.NDArray[np.int64]]:
        """The most likely level per row and dimension."""
        return {d: np.asarray(LEVELS)[np.argmax(x @ self.weights[d].T + self.biases[d], axis=1)] for d in DIMENSIONS}

    def save(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, Any] = {f"{d}_weights": self.weights[d] for d in DIMENSIONS}
        arrays |= {f"{d}_bias": self.biases[d] for d in DIMENSIONS}
        np.savez(folder / MODEL_FILE, **arrays)
        (folder / MANIFEST_FILE).write_text(json.dumps(dict(self.manifest), indent=2) + "\n", encoding="utf-8")
        return folder / MODEL_FILE


def load_epitome(folder: Path) -> EpitomeClassifiers | None:
    """The classifiers saved in ``folder``; None when it holds none."""
    if not (folder / MODEL_FILE).is_file() or not (folder / MANIFEST_FILE).is_file():
        return None
    manifest = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
    with np.load(folder / MODEL_FILE, allow_pickle=False) as arrays:
        weights = {d: np.asarray(arrays[f"{d}_weights"], dtype=np.float64) for d in DIMENSIONS}
        biases = {d: np.asarray(arrays[f"{d}_bias"], dtype=np.float64) for d in DIMENSIONS}
    return EpitomeClassifiers(str(manifest["encoder"]), weights, biases, manifest)


def _fit(x: npt.NDArray[np.float64], y: npt.NDArray[np.int64], c: float) -> Any:
    from sklearn.linear_model import LogisticRegression

    # Balanced class weights: level 1 is rare in every dimension (IP 92 of 2,418 train rows).
    return LogisticRegression(C=c, class_weight="balanced", max_iter=3000).fit(x, y)


def _weights_of(model: Any, n_features: int) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """A levels x features matrix (a level absent from training gets -inf bias, so it is never predicted)."""
    weights = np.zeros((len(LEVELS), n_features))
    biases = np.full(len(LEVELS), -np.inf)
    classes = model.classes_.tolist()
    if len(classes) == 2:
        # sklearn keeps one row for two classes, the second class's score against a zero for the first.
        weights[classes[1]], biases[classes[1]] = model.coef_[0], model.intercept_[0]
        biases[classes[0]] = 0.0
        return weights, biases
    for i, level in enumerate(classes):
        weights[level] = model.coef_[i]
        biases[level] = model.intercept_[i]
    return weights, biases


def train_epitome(data_dir: Path, embed: Embed, encoder: str) -> EpitomeClassifiers:
    """Fit the three classifiers on train, choose C on val, report macro-F1 on test (in the manifest)."""
    from sklearn.metrics import accuracy_score, f1_score

    splits = {}
    for split in SPLITS:
        path = data_dir / f"{split}.csv"
        if not path.is_file():
            raise FileNotFoundError(f"EPITOME split not found: {path}")
        splits[split] = read_epitome_split(path)
    x = {name: features(embed(data.seekers), embed(data.responses)) for name, data in splits.items()}
    weights, biases, scores = {}, {}, {}
    for dimension in DIMENSIONS:
        y = {name: data.levels[dimension] for name, data in splits.items()}
        candidates = []
        for c in REGULARISATION:
            model = _fit(x["train"], y["train"], c)
            candidates.append((f1_score(y["val"], model.predict(x["val"]), average="macro"), c, model))
        val_f1, c, model = max(candidates, key=lambda t: t[0])
        predicted = model.predict(x["test"])
        weights[dimension], biases[dimension] = _weights_of(model, x["train"].shape[1])
        scores[dimension] = {
            "C": c,
            "val_macro_f1": float(val_f1),
            "test_macro_f1": float(f1_score(y["test"], predicted, average="macro")),
            "test_accuracy": float(accuracy_score(y["test"], predicted)),
        }
    manifest = {
        "kind": "epitome-classifiers",
        "note": NOTE,
        "encoder": encoder,
        "features": "[seeker, response, seeker * response] of unit MiniLM sentence embeddings",
        "model": "multinomial logistic regression, class_weight=balanced, C chosen on val",
        "dimensions": scores,
        "rows": {name: len(data.seekers) for name, data in splits.items()},
        "data_sha256": {f"{name}.csv": data.sha256 for name, data in splits.items()},
    }
    return EpitomeClassifiers(encoder, weights, biases, manifest)


def unavailable(reason: str) -> dict[str, Any]:
    """DIFF-EPITOME's entry when it cannot be computed, with the command that makes it computable."""
    return {"status": "unavailable", "reason": reason, "train_command": TRAIN_COMMAND}


def diff_epitome(
    contexts: Sequence[str],
    replies: Sequence[str],
    references: Sequence[str],
    classifiers: EpitomeClassifiers,
    embed: Embed,
) -> dict[str, Any]:
    """Per dimension the mean |level(context, reply) - level(context, reference)| (0-2; lower = closer to the
    reference's empathy), and ``mean`` over the three; with the mean levels of replies and references.
    ``per_row`` holds each row's mean over the three dimensions (``mean`` is their mean), for comparisons paired
    by context such as the evaluation gate's.

    EmPO's code squares each difference; with levels 0-2 that weighs a 0-vs-2 miss 4 instead of 2.
    """
    out: dict[str, Any] = {"status": "ok", "classifiers": NOTE, "encoder": classifiers.encoder, "n": len(replies)}
    if not replies:
        return out | {d: None for d in (*DIMENSIONS, "mean")} | {"per_row": []}
    context_vectors = embed(list(contexts))
    reply_levels = classifiers.predict(features(context_vectors, embed(list(replies))))
    reference_levels = classifiers.predict(features(context_vectors, embed(list(references))))
    gaps = np.stack([np.abs(reply_levels[d] - reference_levels[d]) for d in DIMENSIONS]).astype(np.float64)
    for i, dimension in enumerate(DIMENSIONS):
        out[dimension] = float(gaps[i].mean())
    out["mean"] = float(np.mean([out[d] for d in DIMENSIONS]))
    out["per_row"] = [float(v) for v in gaps.mean(axis=0)]
    out["reply_levels"] = {d: float(reply_levels[d].mean()) for d in DIMENSIONS}
    out["reference_levels"] = {d: float(reference_levels[d].mean()) for d in DIMENSIONS}
    return out
