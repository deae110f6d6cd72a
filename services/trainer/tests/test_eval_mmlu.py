"""MMLU through lm-eval: the skip without a local copy, the task configuration, and a run on fabricated data.

The real MMLU is not available offline; the run below checks the wiring (local Parquet files, 5-shot
prompts, accuracy aggregation) on a one-subject copy with a tiny random model, not MMLU figures.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from emili_testing.plugin import tiny_llama
from emili_trainer.evaluation.mmlu import GROUP, SKIP_MESSAGE, mmlu_subjects, mmlu_task_config, run_mmlu


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
    with pytest.raises(FileNotFoundError, match=r"not a local copy of cais/mmlu.*56 subject"):
        mmlu_task_config(tmp_path)
    with pytest.raises(ValueError, match="unknown MMLU subjects"):
        mmlu_task_config(tmp_path, ["anatomy", "cooking"])


def test_runs_on_a_fabricated_local_copy(tmp_path: Path) -> None:
    data = tmp_path / "mmlu"
    _write_subject(data, "anatomy", test_rows=4)
    words = "question 1 2 3 A B C D . Answer : cat dog sad happy The following are multiple choice about anatomy"
    vocab = {w: i for i, w in enumerate(["<unk>", "<pad>", "<s>", "</s>", *words.split()])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    model = tiny_llama(tokenizer).eval()
    result = run_mmlu(
        model, tokenizer, mmlu_path=data, subjects=["anatomy"], device="cpu", cache_dir=tmp_path / "cache"
    )
    assert result["task"] == "mmlu" and result["num_fewshot"] == 5
    assert result["n_subjects"] == 1 and set(result["subjects"]) == {"anatomy"}
    # Four questions: the accuracy is a multiple of 1/4, and the group's equals its one subject's.
    assert result["acc"] is not None and (result["acc"] * 4).is_integer()
    assert result["acc"] == pytest.approx(result["subjects"]["anatomy"])
