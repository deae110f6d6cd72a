"""MMLU (5-shot accuracy) with lm-evaluation-harness, from a local copy of the data set only.

The harness's own ``mmlu`` tasks load ``cais/mmlu`` from the Hugging Face Hub. EMILI's machines have no
network, so :func:`run_mmlu` reuses the harness's task definitions (prompt format, ``first_n`` few-shot
sampler, accuracy over the letters A-D, size-weighted mean over subjects) and only replaces where the data
comes from. Two layouts of a local copy are read:

* the Hub repository's Parquet files (``huggingface-cli download cais/mmlu --repo-type dataset``)::

    <mmlu_path>/<subject>/test-00000-of-00001.parquet    scored questions
    <mmlu_path>/<subject>/dev-00000-of-00001.parquet     the five few-shot examples

* the original CSV release (Hendrycks et al.; no header, rows ``question,A,B,C,D,answer`` with the answer
  a letter)::

    <mmlu_path>/test/<subject>_test.csv
    <mmlu_path>/dev/<subject>_dev.csv

  These are converted to the Hub's columns (``question``, ``subject``, ``choices``, ``answer`` 0-3) in a
  temporary folder, so both layouts give the harness the same documents.

Without a configured copy the result is ``{"skipped": ...}``, never a download. BENCHMARKS.md, "MMLU (real
data)", has figures of a run on the real data (CSV layout).
"""

from __future__ import annotations

import csv
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "GROUP",
    "SKIP_MESSAGE",
    "convert_csv_layout",
    "mmlu_layout",
    "mmlu_subjects",
    "mmlu_task_config",
    "mmlu_tasks_dir",
    "run_mmlu",
]

SKIP_MESSAGE = "no local MMLU copy configured (EMILI_TRAINER__MMLU_PATH); lm-eval would need to download it"
GROUP = "emili_mmlu_local"
NUM_FEWSHOT = 5


def mmlu_tasks_dir() -> Path:
    """The harness's folder of default MMLU task configs (one ``mmlu_<subject>.yaml`` per subject)."""
    import lm_eval

    return Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "default"


def mmlu_subjects() -> list[str]:
    """The 57 MMLU subjects, as the harness names them (``abstract_algebra`` ... ``world_religions``)."""
    return sorted(p.stem.removeprefix("mmlu_") for p in mmlu_tasks_dir().glob("mmlu_*.yaml"))


ANSWER_LETTERS = ("A", "B", "C", "D")


def _csv_file(root: Path, split: str, subject: str) -> Path:
    return root / split / f"{subject}_{split}.csv"


def mmlu_layout(mmlu_path: str | Path) -> str:
    """``"csv"`` for the original release (``test/<subject>_test.csv``), else ``"parquet"`` (the Hub's)."""
    return "csv" if (Path(mmlu_path) / "test").is_dir() and (Path(mmlu_path) / "dev").is_dir() else "parquet"


def _read_csv_split(path: Path, subject: str) -> list[dict[str, Any]]:
    rows = []
    with path.open(newline="", encoding="utf-8") as handle:
        for line, fields in enumerate(csv.reader(handle), start=1):
            if len(fields) != 6 or fields[5].strip() not in ANSWER_LETTERS:
                raise ValueError(f"{path}:{line}: expected question,A,B,C,D,answer with answer A-D, got {fields!r}")
            rows.append(
                {
                    "question": fields[0],
                    "subject": subject,
                    "choices": fields[1:5],
                    "answer": ANSWER_LETTERS.index(fields[5].strip()),
                }
            )
    return rows


def convert_csv_layout(mmlu_path: str | Path, subjects: Sequence[str], out_dir: str | Path) -> Path:
    """The chosen subjects of a CSV-layout copy as JSON-lines files in the Hub's columns, under ``out_dir``.

    Writes ``<out_dir>/<subject>/{test,dev}.jsonl`` and returns ``out_dir``. A malformed row raises
    ValueError naming its file and line.
    """
    root, out = Path(mmlu_path), Path(out_dir)
    for subject in subjects:
        (out / subject).mkdir(parents=True, exist_ok=True)
        for split in ("test", "dev"):
            rows = _read_csv_split(_csv_file(root, split, subject), subject)
            with (out / subject / f"{split}.jsonl").open("w", encoding="utf-8") as handle:
                handle.writelines(json.dumps(row) + "\n" for row in rows)
    return out


def _data_files(root: Path, subject: str, layout: str, converted: Path | None) -> dict[str, str]:
    if layout == "csv":
        assert converted is not None
        return {split: str(converted / subject / f"{split}.jsonl") for split in ("test", "dev")}
    return {split: str(root / subject / f"{split}-*.parquet") for split in ("test", "dev")}


def _has_subject(root: Path, subject: str, layout: str) -> bool:
    if layout == "csv":
        return all(_csv_file(root, split, subject).is_file() for split in ("test", "dev"))
    return any((root / subject).glob("test-*.parquet")) and any((root / subject).glob("dev-*.parquet"))


def _check_copy(root: Path, subjects: Sequence[str] | None) -> tuple[list[str], str]:
    """The chosen subjects (all 57 by default) and the copy's layout; raises on unknown or missing subjects."""
    chosen = list(subjects) if subjects is not None else mmlu_subjects()
    known = set(mmlu_subjects())
    unknown = [s for s in chosen if s not in known]
    if unknown:
        raise ValueError(f"unknown MMLU subjects: {unknown}")
    layout = mmlu_layout(root)
    missing = [s for s in chosen if not _has_subject(root, s, layout)]
    if missing:
        expected = (
            "test/<subject>_test.csv and dev/<subject>_dev.csv"
            if layout == "csv"
            else "<subject>/test-*.parquet and dev-*.parquet"
        )
        raise FileNotFoundError(
            f"{root} is not a local copy of MMLU: no {expected} for "
            f"{len(missing)} subject(s): {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
        )
    return chosen, layout


def mmlu_task_config(
    mmlu_path: str | Path,
    subjects: Sequence[str] | None = None,
    cache_dir: str | Path | None = None,
    converted: str | Path | None = None,
) -> dict[str, Any]:
    """An inline lm-eval group: the harness's ``mmlu_<subject>`` tasks with their data read from ``mmlu_path``.

    Each member overrides only ``dataset_path`` (the ``parquet`` or ``json`` loader), ``dataset_name`` and
    ``dataset_kwargs`` (the subject's local files); the group's accuracy is the mean over subjects weighted
    by their number of questions, as the harness's own ``mmlu`` group computes it. A CSV-layout copy needs
    ``converted``, the folder :func:`convert_csv_layout` wrote. ``cache_dir`` is where ``datasets`` keeps its
    converted copy (default: its own cache). Raises FileNotFoundError naming the subjects whose files are
    missing.
    """
    root = Path(mmlu_path)
    chosen, layout = _check_copy(root, subjects)
    if layout == "csv" and converted is None:
        raise ValueError(f"{root} holds the CSV layout: convert it first (convert_csv_layout) and pass converted")
    cache = {"cache_dir": str(cache_dir)} if cache_dir is not None else {}
    members = [
        {
            "task": f"mmlu_{subject}",
            "dataset_path": "json" if layout == "csv" else "parquet",
            "dataset_name": None,
            "dataset_kwargs": {
                "data_files": _data_files(root, subject, layout, Path(converted) if converted else None),
                **cache,
            },
        }
        for subject in chosen
    ]
    return {
        "group": GROUP,
        "task": members,
        "aggregate_metric_list": [{"metric": "acc", "aggregation": "mean", "weight_by_size": True}],
        "metadata": {"version": 1.0, "source": str(root), "layout": layout},
    }


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) else None


def run_mmlu(
    model: Any,
    tokenizer: Any = None,
    *,
    mmlu_path: str | Path | None,
    subjects: Sequence[str] | None = None,
    num_fewshot: int = NUM_FEWSHOT,
    limit: int | None = None,
    batch_size: int = 1,
    device: str | None = None,
    cache_dir: str | Path | None = None,
) -> dict[str, Any]:
    """5-shot MMLU accuracy of a model (a loaded transformers model with its tokenizer, or a model folder).

    Returns ``{"skipped": SKIP_MESSAGE}`` when ``mmlu_path`` is None; otherwise ``{"task": "mmlu",
    "num_fewshot", "acc", "acc_stderr", "subjects": {subject: acc}, "n_subjects", "n_questions",
    "questions": {subject: n}, "correct": {subject: [0 or 1 per question, by position in its test split]},
    "limit", "source", "layout", "wall_seconds", "lm_eval_version"}``. ``correct`` lets two models be compared
    question by question (the evaluation gate's paired ``mmlu_correct``).
    ``subjects`` picks a subset (a demo run; its accuracy is over those subjects only, not MMLU's).
    ``limit`` (questions per subject) is for smoke runs only: its accuracy is not MMLU's either.
    """
    if mmlu_path is None:
        return {"skipped": SKIP_MESSAGE}
    started = time.perf_counter()
    chosen, layout = _check_copy(Path(mmlu_path), subjects)  # Fails before the model is wrapped.

    import lm_eval
    import yaml
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if isinstance(model, str | Path):
        lm = HFLM(pretrained=str(model), tokenizer=tokenizer, batch_size=batch_size, device=device or "cpu")
    else:
        if tokenizer is None:
            raise ValueError("a loaded model needs its tokenizer")
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device or str(model.device))
    with tempfile.TemporaryDirectory(prefix="emili-mmlu-") as folder:
        converted = convert_csv_layout(mmlu_path, chosen, Path(folder) / "data") if layout == "csv" else None
        config = mmlu_task_config(mmlu_path, chosen, cache_dir, converted=converted)
        # A group given inline (as a dict) passes its aggregate_metric_list down to its tasks, which
        # lm-eval 0.4.13 rejects; a group read from a YAML file does not.
        (Path(folder) / f"{GROUP}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        # Only the MMLU configs are indexed: indexing every harness task takes seconds and is not needed.
        manager = TaskManager(include_defaults=False, include_path=[str(mmlu_tasks_dir()), folder])
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=[GROUP],
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=manager,
            log_samples=True,  # Per-question correctness; each sample is reduced to 0/1 below.
        )
    if results is None:  # Only non-zero ranks of a distributed run get None; EMILI runs one process.
        raise RuntimeError("lm-eval returned no results")
    scores = results["results"]
    group = scores.get(GROUP, {})
    per_subject = {
        name.removeprefix("mmlu_"): _number(values.get("acc,none"))
        for name, values in scores.items()
        if name != GROUP and name.startswith("mmlu_")
    }
    counts = results.get("n-samples") or {}
    questions = {
        name.removeprefix("mmlu_"): int((counts.get(name) or {}).get("effective", 0))
        for name in scores
        if name != GROUP and name.startswith("mmlu_")
    }
    correct = {
        name.removeprefix("mmlu_"): [int(bool(x["acc"])) for x in sorted(logged, key=lambda x: int(x["doc_id"]))]
        for name, logged in (results.get("samples") or {}).items()
        if name != GROUP and name.startswith("mmlu_")
    }
    return {
        "task": "mmlu",
        "num_fewshot": num_fewshot,
        "acc": _number(group.get("acc,none")),
        "acc_stderr": _number(group.get("acc_stderr,none")),
        "subjects": per_subject,
        "n_subjects": len(per_subject),
        "questions": questions,
        "n_questions": sum(questions.values()),
        "correct": correct,
        "limit": limit,
        "source": str(Path(mmlu_path)),
        "layout": layout,
        "wall_seconds": time.perf_counter() - started,
        "lm_eval_version": getattr(lm_eval, "__version__", "unknown"),
    }
