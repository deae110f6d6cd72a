"""MMLU (5-shot accuracy) with lm-evaluation-harness, from a local copy of the data set only.

The harness's own ``mmlu`` tasks load ``cais/mmlu`` from the Hugging Face Hub. EMILI's machines have no
network, so :func:`run_mmlu` reuses the harness's task definitions (prompt format, ``first_n`` few-shot
sampler, accuracy over the letters A-D, size-weighted mean over subjects) and only replaces where the data
comes from: each subject's task reads the Parquet files of a local copy laid out like the Hub repository::

    <mmlu_path>/<subject>/test-00000-of-00001.parquet    scored questions
    <mmlu_path>/<subject>/dev-00000-of-00001.parquet     the five few-shot examples

(``huggingface-cli download cais/mmlu --repo-type dataset --local-dir <mmlu_path>`` on a machine with
network produces it.) Without a configured copy the result is ``{"skipped": ...}``, never a download.

What has been run: the argument construction and a run of the harness on a tiny random model over a
fabricated one-subject copy (the tests). What has not: a run on the real MMLU data, which this project's
machines do not have; its figures are therefore unverified here.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "GROUP",
    "SKIP_MESSAGE",
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


def mmlu_task_config(
    mmlu_path: str | Path, subjects: Sequence[str] | None = None, cache_dir: str | Path | None = None
) -> dict[str, Any]:
    """An inline lm-eval group: the harness's ``mmlu_<subject>`` tasks with their data read from ``mmlu_path``.

    Each member overrides only ``dataset_path`` (the ``parquet`` loader), ``dataset_name`` and
    ``dataset_kwargs`` (the subject's local files); the group's accuracy is the mean over subjects weighted
    by their number of questions, as the harness's own ``mmlu`` group computes it. ``cache_dir`` is where
    ``datasets`` keeps its converted copy (default: its own cache). Raises FileNotFoundError naming the
    subjects whose files are missing.
    """
    root = Path(mmlu_path)
    chosen = list(subjects) if subjects is not None else mmlu_subjects()
    known = set(mmlu_subjects())
    unknown = [s for s in chosen if s not in known]
    if unknown:
        raise ValueError(f"unknown MMLU subjects: {unknown}")
    missing = [
        s for s in chosen if not (any((root / s).glob("test-*.parquet")) and any((root / s).glob("dev-*.parquet")))
    ]
    if missing:
        raise FileNotFoundError(
            f"{root} is not a local copy of cais/mmlu: no <subject>/test-*.parquet and dev-*.parquet for "
            f"{len(missing)} subject(s): {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
        )
    cache = {"cache_dir": str(cache_dir)} if cache_dir is not None else {}
    members = [
        {
            "task": f"mmlu_{subject}",
            "dataset_path": "parquet",
            "dataset_name": None,
            "dataset_kwargs": {
                "data_files": {
                    "test": str(root / subject / "test-*.parquet"),
                    "dev": str(root / subject / "dev-*.parquet"),
                },
                **cache,
            },
        }
        for subject in chosen
    ]
    return {
        "group": GROUP,
        "task": members,
        "aggregate_metric_list": [{"metric": "acc", "aggregation": "mean", "weight_by_size": True}],
        "metadata": {"version": 1.0, "source": str(root)},
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
    "num_fewshot", "acc", "acc_stderr", "subjects": {subject: acc}, "n_subjects", "limit", "source",
    "lm_eval_version"}``. ``limit`` (questions per subject) is for smoke runs only: its accuracy is not MMLU's.
    """
    if mmlu_path is None:
        return {"skipped": SKIP_MESSAGE}
    config = mmlu_task_config(mmlu_path, subjects, cache_dir)

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
            log_samples=False,
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
    return {
        "task": "mmlu",
        "num_fewshot": num_fewshot,
        "acc": _number(group.get("acc,none")),
        "acc_stderr": _number(group.get("acc_stderr,none")),
        "subjects": per_subject,
        "n_subjects": len(per_subject),
        "limit": limit,
        "source": str(Path(mmlu_path)),
        "lm_eval_version": getattr(lm_eval, "__version__", "unknown"),
    }
