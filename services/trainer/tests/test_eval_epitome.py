"""DIFF-EPITOME on hand-built classifiers, the classifiers' training, saving and loading, and BERTScore."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from emili_core.settings import REPO_ROOT
from emili_trainer.evaluation.epitome import (
    DIMENSIONS,
    MANIFEST_FILE,
    EpitomeClassifiers,
    diff_epitome,
    load_epitome,
    read_epitome_split,
    train_epitome,
)
from emili_trainer.evaluation.metrics import reply_metrics

# Three-dimensional "embeddings": a response's one-hot says which level the hand-built classifiers predict.
VECTORS = {"ctx": [1.0, 1.0, 1.0], "none": [1.0, 0.0, 0.0], "weak": [0.0, 1.0, 0.0], "strong": [0.0, 0.0, 1.0]}


def embed(texts: Sequence[str]) -> np.ndarray[Any, Any]:
    return np.array([VECTORS[t] for t in texts])


def _classifiers() -> EpitomeClassifiers:
    """Features are [seeker(3), response(3), product(3)]: ER and IP read the response's level straight off its
    one-hot; EX reads it reversed (none -> 2, strong -> 0), so the dimensions differ."""
    straight = np.hstack([np.zeros((3, 3)), np.eye(3), np.zeros((3, 3))])
    reversed_ = np.hstack([np.zeros((3, 3)), np.eye(3)[::-1], np.zeros((3, 3))])
    weights = {"er": straight, "ip": straight, "ex": reversed_}
    return EpitomeClassifiers("toy", weights, {d: np.zeros(3) for d in DIMENSIONS}, {"encoder": "toy"})


def test_diff_epitome_by_hand() -> None:
    contexts = ["ctx", "ctx", "ctx"]
    replies = ["none", "strong", "weak"]
    references = ["strong", "strong", "none"]
    result = diff_epitome(contexts, replies, references, _classifiers(), embed)
    # ER/IP levels: replies 0, 2, 1; references 2, 2, 0 -> |diff| 2, 0, 1 -> mean 1.
    # EX levels (reversed): replies 2, 0, 1; references 0, 0, 2 -> |diff| 2, 0, 1 -> mean 1 as well.
    assert result["er"] == pytest.approx(1.0) and result["ip"] == pytest.approx(1.0)
    assert result["ex"] == pytest.approx(1.0)
    assert result["mean"] == pytest.approx(1.0)
    assert result["reply_levels"]["er"] == pytest.approx(1.0)
    assert result["reference_levels"]["ex"] == pytest.approx(2 / 3)
    # Per row, the mean over the three dimensions (the gate's paired items); their mean is the metric's.
    assert result["per_row"] == [pytest.approx(2.0), 0.0, pytest.approx(1.0)]
    same = diff_epitome(contexts, references, references, _classifiers(), embed)
    assert same["mean"] == 0.0 and same["per_row"] == [0.0, 0.0, 0.0]
    assert diff_epitome([], [], [], _classifiers(), embed)["per_row"] == []


def test_reply_metrics_reports_diff_epitome_with_classifiers() -> None:
    rows = [("ctx", "none", "strong"), ("ctx", "weak", "weak")]
    result = reply_metrics(rows, embed=embed, epitome=_classifiers())
    # ER: |0 - 2| and |1 - 1| -> 1.0; EX: |2 - 0| and |1 - 1| -> 1.0.
    assert result["diff_epitome"]["status"] == "ok"
    assert result["diff_epitome"]["er"] == pytest.approx(1.0)
    assert result["diff_epitome"]["ex"] == pytest.approx(1.0)
    json.dumps(result, allow_nan=False)
    without_embed = reply_metrics(rows, epitome=_classifiers())
    assert without_embed["diff_epitome"]["status"] == "unavailable"


def test_classifiers_round_trip(tmp_path: Path) -> None:
    saved = _classifiers()
    saved.save(tmp_path)
    loaded = load_epitome(tmp_path)
    assert loaded is not None and loaded.encoder == "toy"
    x = np.random.default_rng(0).normal(size=(5, 9))
    for d in DIMENSIONS:
        assert loaded.predict(x)[d].tolist() == saved.predict(x)[d].tolist()
    assert load_epitome(tmp_path / "absent") is None


def _write_split(path: Path, rows: list[tuple[str, str, int, int, int]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "seeker_post", "response_post", "ER_level", "EX_level", "IP_level"])
        for i, (seeker, response, er, ex, ip) in enumerate(rows):
            writer.writerow([i, seeker, response, er, ex, ip])


def test_train_epitome_on_separable_data(tmp_path: Path) -> None:
    # ER follows the response's one-hot; EX the reverse; IP is 2 for "strong" only. Separable, so F1 is 1.
    levels = {"none": (0, 2, 0), "weak": (1, 1, 0), "strong": (2, 0, 2)}
    rows = [("ctx", r, *levels[r]) for r in ("none", "weak", "strong") for _ in range(6)]
    for split in ("train", "val", "test"):
        _write_split(tmp_path / f"{split}.csv", rows)
    classifiers = train_epitome(tmp_path, embed, "toy")
    manifest = classifiers.manifest
    assert manifest["rows"] == {"train": 18, "val": 18, "test": 18}
    for dimension in DIMENSIONS:
        assert manifest["dimensions"][dimension]["test_macro_f1"] == pytest.approx(1.0)
    predicted = classifiers.predict(
        np.hstack([embed(["ctx"] * 3), embed(["none", "weak", "strong"]), embed(["none", "weak", "strong"])])
    )
    assert predicted["ex"].tolist() == [2, 1, 0]
    assert predicted["ip"].tolist() == [0, 0, 2]
    classifiers.save(tmp_path / "model")
    assert "not Sharma" in json.loads((tmp_path / "model" / MANIFEST_FILE).read_text())["note"]


def test_read_epitome_split_rejects_bad_files(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("seeker_post,response_post\na,b\n", encoding="utf-8")
    with pytest.raises(ValueError, match="expected the columns"):
        read_epitome_split(path)
    _write_split(path, [("a", "b", 3, 0, 0)])
    with pytest.raises(ValueError, match="ER_level must be 0, 1 or 2"):
        read_epitome_split(path)


EPITOME = REPO_ROOT.parent / "shared" / "data" / "epitome"


def test_read_the_epitome_test_split() -> None:
    if not (EPITOME / "test.csv").is_file():
        pytest.skip(f"development data absent: {EPITOME}")
    data = read_epitome_split(EPITOME / "test.csv")
    assert len(data.seekers) == len(data.responses) == 302
    assert set(np.unique(data.levels["er"]).tolist()) <= {0, 1, 2}


MINILM = REPO_ROOT / "var" / "artifacts" / "labeler" / "all-MiniLM-L6-v2"


def test_bertscore_with_the_local_minilm() -> None:
    if not (MINILM / "config.json").is_file():
        pytest.skip(f"MiniLM artefact absent: {MINILM} (make artifacts)")
    from emili_trainer.evaluation.bertscore import NOT_COMPARABLE, BertScorer

    scorer = BertScorer(MINILM)
    same = scorer.score(["I am so sorry to hear that."], ["I am so sorry to hear that."])
    # Identical texts match every token with itself: precision = recall = F1 = 1 (no baseline rescaling).
    assert same["f1"] == pytest.approx(1.0, abs=1e-5)
    other = scorer.score(["I am so sorry to hear that."], ["The train leaves at noon."])
    assert other["f1"] < same["f1"]
    assert other["encoder"] == "all-MiniLM-L6-v2 (layer 6)" and other["note"] == NOT_COMPARABLE
    assert scorer.score([], [])["f1"] is None
    # An empty reply matches nothing: 0, and the mean is over both pairs.
    with_empty = scorer.score(["I am so sorry to hear that.", "  "], ["I am so sorry to hear that.", "Oh no."])
    assert with_empty["f1"] == pytest.approx(0.5, abs=1e-5)


def test_unmeasurable_gate_metrics_say_what_is_missing_and_how_to_get_it(tmp_path: Path) -> None:
    from emili_trainer.evaluation.scorers import unmeasurable_gate_metrics
    from emili_trainer.settings import TrainerOptions

    options = TrainerOptions(epitome_dir=Path("epitome"), embedding_model=Path("minilm"), mmlu_path=None)
    reasons = unmeasurable_gate_metrics(options, tmp_path)
    assert set(reasons) == {"diff_epitome_mean", "mmlu_correct"}
    assert "emili eval train-epitome" in reasons["diff_epitome_mean"]
    assert "EMILI_TRAINER__MMLU_PATH" in reasons["mmlu_correct"]

    _classifiers().save(tmp_path / "epitome")
    assert "MiniLM embedder" in unmeasurable_gate_metrics(options, tmp_path)["diff_epitome_mean"]
    (tmp_path / "minilm").mkdir()
    (tmp_path / "minilm" / "config.json").write_text("{}")
    (tmp_path / "mmlu").mkdir()
    assert unmeasurable_gate_metrics(options.model_copy(update={"mmlu_path": tmp_path / "mmlu"}), tmp_path) == {}
    gone = options.model_copy(update={"mmlu_path": tmp_path / "no-such-folder"})
    assert "not at EMILI_TRAINER__MMLU_PATH" in unmeasurable_gate_metrics(gone, tmp_path)["mmlu_correct"]
