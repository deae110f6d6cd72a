"""MMLU through lm-eval: the skip without a local copy, the task configuration of both local layouts (the Hub's
Parquet files, the original CSV files), and runs on fabricated data.

The runs check the wiring (local files, 5-shot prompts, accuracy aggregation) on a one-subject copy with a tiny
random model, not MMLU figures. The real data (EMILI_TEST_MMLU_PATH, default ../shared/data/mmlu) is read when
present, to check the CSV conversion against it; BENCHMARKS.md has the figures of a real run.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from emili_core.settings import REPO_ROOT
from emili_testing.plugin import tiny_llama
from emili_trainer.evaluation.mmlu import (
    GROUP,
    SKIP_MESSAGE,
    convert_csv_layout,
    mmlu_layout,
    mmlu_subjects,
    mmlu_task_config,
    run_mmlu,
)

REAL_MMLU = Path(os.environ.get("EMILI_TEST_MMLU_PATH", REPO_ROOT.parent / "shared" / "data" / "mmlu"))
CHOICES = ["cat", "dog", "sad", "happy"]


def _write_subject(root: Path, subject: str, test_rows: int = 4) -> None:
    folder = root / subject
    folder.mkdir(parents=True)
    for split, n in (("test", test_rows), ("dev", 5)):
        table = pa.table(
            {
                "question": [f"question {i % 3 + 1}" for i in range(n)],
                "subject": [subject] * n,
                "choices": [["cat", "dog", "sad", "happy"]] * n,
                "answer": [i % 4 for i in range(n)],
            }
        )
        pq.write_table(table, folder / f"{split}-00000-of-00001.parquet")


def _write_csv_subject(root: Path, subject: str, test_rows: int = 4) -> None:
    """The original release's layout: no header, question,A,B,C,D,answer-letter."""
    for split, n in (("test", test_rows), ("dev", 5)):
        (root / split).mkdir(parents=True, exist_ok=True)
        with (root / split / f"{subject}_{split}.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            for i in range(n):
                writer.writerow([f"question {i % 3 + 1}", *CHOICES, "ABCD"[i % 4]])


def _tiny_model_and_tokenizer() -> tuple[object, PreTrainedTokenizerFast]:
    words = "question 1 2 3 A B C D . Answer : cat dog sad happy The following are multiple choice about anatomy"
    vocab = {w: i for i, w in enumerate(["<unk>", "<pad>", "<s>", "</s>", *words.split()])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    return tiny_llama(tokenizer).eval(), tokenizer


def test_skipped_without_a_local_copy() -> None:
    result = run_mmlu(object(), object(), mmlu_path=None)
    assert result == {"skipped": SKIP_MESSAGE}
    assert "EMILI_TRAINER__MMLU_PATH" in result["skipped"]


def test_subjects_are_the_harness_ones() -> None:
    subjects = mmlu_subjects()
    assert len(subjects) == 57
    assert {"abstract_algebra", "anatomy", "world_religions"} <= set(subjects)


def test_task_config_points_every_subject_at_local_files(tmp_path: Path) -> None:
    _write_subject(tmp_path, "anatomy")
    _write_subject(tmp_path, "virology")
    config = mmlu_task_config(tmp_path, ["anatomy", "virology"])
    assert config["group"] == GROUP
    assert config["aggregate_metric_list"] == [{"metric": "acc", "aggregation": "mean", "weight_by_size": True}]
    anatomy = config["task"][0]
    assert anatomy == {
        "task": "mmlu_anatomy",
        "dataset_path": "parquet",
        "dataset_name": None,
        "dataset_kwargs": {
            "data_files": {
                "test": str(tmp_path / "anatomy" / "test-*.parquet"),
                "dev": str(tmp_path / "anatomy" / "dev-*.parquet"),
            }
        },
    }
    assert [t["task"] for t in config["task"]] == ["mmlu_anatomy", "mmlu_virology"]
    cached = mmlu_task_config(tmp_path, ["anatomy"], cache_dir=tmp_path / "cache")
    assert cached["task"][0]["dataset_kwargs"]["cache_dir"] == str(tmp_path / "cache")


def test_task_config_names_missing_and_unknown_subjects(tmp_path: Path) -> None:
    _write_subject(tmp_path, "anatomy")
    with pytest.raises(FileNotFoundError, match=r"not a local copy of MMLU.*parquet.*56 subject"):
        mmlu_task_config(tmp_path)
    with pytest.raises(ValueError, match="unknown MMLU subjects"):
        mmlu_task_config(tmp_path, ["anatomy", "cooking"])


def test_runs_on_a_fabricated_local_copy(tmp_path: Path) -> None:
    data = tmp_path / "mmlu"
    _write_subject(data, "anatomy", test_rows=4)
    model, tokenizer = _tiny_model_and_tokenizer()
    result = run_mmlu(
        model, tokenizer, mmlu_path=data, subjects=["anatomy"], device="cpu", cache_dir=tmp_path / "cache"
    )
    assert result["task"] == "mmlu" and result["num_fewshot"] == 5
    assert result["n_subjects"] == 1 and set(result["subjects"]) == {"anatomy"}
    # Four questions: the accuracy is a multiple of 1/4, and the group's equals its one subject's.
    assert result["acc"] is not None and (result["acc"] * 4).is_integer()
    assert result["acc"] == pytest.approx(result["subjects"]["anatomy"])
    assert result["layout"] == "parquet" and result["n_questions"] == 4 and result["questions"] == {"anatomy": 4}
    # Per question, 0 or 1 (the gate pairs two models question by question); their mean is the accuracy.
    correct = result["correct"]["anatomy"]
    assert len(correct) == 4 and set(correct) <= {0, 1} and sum(correct) / 4 == pytest.approx(result["acc"])
    assert result["wall_seconds"] > 0


def test_csv_layout_is_converted_to_the_hub_columns(tmp_path: Path) -> None:
    data = tmp_path / "mmlu"
    _write_csv_subject(data, "anatomy", test_rows=6)
    assert mmlu_layout(data) == "csv" and mmlu_layout(tmp_path) == "parquet"
    out = convert_csv_layout(data, ["anatomy"], tmp_path / "converted")
    rows = [json.loads(line) for line in (out / "anatomy" / "test.jsonl").read_text().splitlines()]
    assert len(rows) == 6
    assert rows[1] == {"question": "question 2", "subject": "anatomy", "choices": CHOICES, "answer": 1}
    assert [r["answer"] for r in rows] == [0, 1, 2, 3, 0, 1]
    assert len((out / "anatomy" / "dev.jsonl").read_text().splitlines()) == 5
    config = mmlu_task_config(data, ["anatomy"], converted=out)
    member = config["task"][0]
    assert member["dataset_path"] == "json" and config["metadata"]["layout"] == "csv"
    assert member["dataset_kwargs"]["data_files"] == {
        "test": str(out / "anatomy" / "test.jsonl"),
        "dev": str(out / "anatomy" / "dev.jsonl"),
    }
    with pytest.raises(ValueError, match="convert it first"):
        mmlu_task_config(data, ["anatomy"])
    with pytest.raises(FileNotFoundError, match=r"test/<subject>_test.csv.*1 subject\(s\): virology"):
        mmlu_task_config(data, ["anatomy", "virology"], converted=out)


def test_malformed_csv_rows_are_named(tmp_path: Path) -> None:
    data = tmp_path / "mmlu"
    _write_csv_subject(data, "anatomy")
    with (data / "test" / "anatomy_test.csv").open("a", newline="") as handle:
        csv.writer(handle).writerow(["question 9", *CHOICES, "E"])
    with pytest.raises(ValueError, match=r"anatomy_test.csv:5: expected question,A,B,C,D,answer"):
        convert_csv_layout(data, ["anatomy"], tmp_path / "converted")


def test_runs_on_a_fabricated_csv_copy(tmp_path: Path) -> None:
    data = tmp_path / "mmlu"
    _write_csv_subject(data, "anatomy", test_rows=4)
    model, tokenizer = _tiny_model_and_tokenizer()
    result = run_mmlu(
        model, tokenizer, mmlu_path=data, subjects=["anatomy"], device="cpu", cache_dir=tmp_path / "cache"
    )
    assert result["layout"] == "csv" and result["n_subjects"] == 1 and result["n_questions"] == 4
    assert result["acc"] is not None and (result["acc"] * 4).is_integer()
    assert result["acc"] == pytest.approx(result["subjects"]["anatomy"])


def test_the_real_csv_copy_converts(tmp_path: Path) -> None:
    if not (REAL_MMLU / "test" / "anatomy_test.csv").is_file():
        pytest.skip(f"no MMLU copy at {REAL_MMLU} (set EMILI_TEST_MMLU_PATH)")
    assert mmlu_layout(REAL_MMLU) == "csv"
    out = convert_csv_layout(REAL_MMLU, ["anatomy", "abstract_algebra"], tmp_path)
    with (REAL_MMLU / "test" / "anatomy_test.csv").open(newline="") as handle:
        raw = list(csv.reader(handle))
    rows = [json.loads(line) for line in (out / "anatomy" / "test.jsonl").read_text().splitlines()]
    assert len(rows) == len(raw)
    assert all(r["choices"][r["answer"]] == line[1 + "ABCD".index(line[5])] for r, line in zip(rows, raw, strict=True))
    assert len((out / "abstract_algebra" / "dev.jsonl").read_text().splitlines()) == 5  # The 5-shot examples.
    assert len(mmlu_task_config(REAL_MMLU, converted=out)["task"]) == 57  # Every subject has both CSV files.
