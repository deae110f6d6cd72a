"""The evaluation report: Table 1 from rating records, Table 2 from the labeler, Markdown and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from emili_trainer.evaluation.metrics import reply_metrics
from emili_trainer.evaluation.mmlu import SKIP_MESSAGE
from emili_trainer.evaluation.report import (
    NO_DELTAS,
    NO_MMLU,
    NO_RATINGS,
    NO_REPLY_METRICS,
    build_report,
    ratings_table,
    render_markdown,
    render_plots,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RATINGS = [
    {"model_arm": "base", "empathy": 3, "relevance": 4, "fluency": 5},
    {"model_arm": "base", "empathy": 5, "relevance": 4, "fluency": 5},
    {"model_arm": "adapter:sft-1", "empathy": 4, "relevance": 5, "fluency": 5, "session_id": "s3"},
]


def _delta_table() -> dict[str, Any]:
    """A labeler delta_table as it arrives (JSON): the trainer reads the labeler's output, never its code."""

    def dim(mean: float, low: float, high: float) -> dict[str, Any]:
        return {"mean": mean, "ci95": [low, high]}

    return {
        "lexicon": "warriner-2013",
        "sessions": 3,
        "arms": {
            "adapter:sft-1": {
                "n": 1,
                "valence": dim(0.4, 0.4, 0.4),
                "arousal": dim(0, 0, 0),
                "dominance": dim(0, 0, 0),
            },
            "base": {
                "n": 2,
                "valence": dim(0.0, -0.1, 0.1),
                "arousal": dim(-0.05, -0.1, 0.0),
                "dominance": dim(0.05, 0.0, 0.1),
            },
        },
    }


def _full_results() -> dict[str, Any]:
    base_rows = [("I am sad.", "I'm sorry to hear that.", "Oh no, what happened?")] * 2
    tuned_rows = [("I am sad.", "Oh no, what happened?", "Oh no, what happened?"), ("Hi", "Hey!", "Hello!")]
    return {
        "title": "Run 7",
        "ratings": RATINGS,
        "delta_table": _delta_table(),
        "reply_metrics": {"base": reply_metrics(base_rows), "adapter:sft-1": reply_metrics(tuned_rows)},
        "perplexity": {"base": 12.5, "adapter:sft-1": 9.25},
        "mmlu": {"skipped": SKIP_MESSAGE},
    }


def test_ratings_table_by_hand() -> None:
    table = ratings_table(RATINGS, samples=500)
    assert list(table) == ["adapter:sft-1", "base"]
    base = table["base"]
    assert base["n"] == 2
    assert base["empathy"]["mean"] == pytest.approx(4.0)
    low, high = base["empathy"]["ci95"]
    assert 3.0 <= low <= 4.0 <= high <= 5.0
    assert base["fluency"]["ci95"] == pytest.approx([5.0, 5.0])  # No spread, no interval.
    assert table["adapter:sft-1"]["relevance"]["mean"] == pytest.approx(5.0)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"model_arm": "base", "empathy": 6, "relevance": 4, "fluency": 5}, "rating 1: empathy"),
        ({"model_arm": "base", "empathy": 3, "relevance": True, "fluency": 5}, "rating 1: relevance"),
        ({"model_arm": "base", "empathy": 3, "relevance": 4}, "rating 1: fluency"),
        ({"empathy": 3, "relevance": 4, "fluency": 5}, "rating 1: model_arm"),
    ],
)
def test_ratings_table_rejects_bad_records(record: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ratings_table([RATINGS[0], record])


def test_markdown_with_every_part_missing() -> None:
    report = build_report({})
    markdown = render_markdown(report)
    for text in (NO_RATINGS, NO_DELTAS, NO_REPLY_METRICS, NO_MMLU):
        assert text in markdown
    json.dumps(report)


def test_markdown_of_a_full_report() -> None:
    report = build_report(_full_results())
    json.dumps(report, allow_nan=False)
    markdown = render_markdown(report)
    assert markdown.startswith("# Run 7")
    assert "| base | 2 | 4.00 [" in markdown  # Table 1 row: n and mean empathy with its CI.
    assert "| adapter:sft-1 | 1 | 4.00 [4.00, 4.00] | 5.00 [5.00, 5.00] |" in markdown
    assert "Lexicon: warriner-2013; sessions: 3." in markdown
    assert "| adapter:sft-1 | 1 | 0.400 [0.400, 0.400] | 0.000 [0.000, 0.000] |" in markdown
    assert "| Metric | base | adapter:sft-1 |" in markdown  # Reply metrics side by side.
    assert "| Reference perplexity | 12.50 | 9.25 |" in markdown
    assert "| Unique replies | 1 | 2 |" in markdown
    assert f"Skipped: {SKIP_MESSAGE}." in markdown
    assert build_report(report) == report  # A report is a valid input too.


def test_a_bare_arm_table_is_accepted_as_table_2() -> None:
    report = build_report({"delta_table": _delta_table()["arms"]})
    assert report["delta_table"]["sessions"] == 3
    assert "| base | 2 |" in render_markdown(report)


def test_markdown_of_mmlu_per_arm() -> None:
    mmlu = {"base": {"acc": 0.5881, "acc_stderr": 0.004, "n_subjects": 57}, "adapter:sft-1": {"skipped": "no GPU"}}
    markdown = render_markdown(build_report({"mmlu": mmlu}))
    assert "| base | 0.588 | 0.004 | 57 |" in markdown
    assert "| adapter:sft-1 | skipped: no GPU | n/a | n/a |" in markdown
    assert NO_RATINGS in markdown


def test_plots_are_png_files(tmp_path: Path) -> None:
    written = render_plots(build_report(_full_results()), tmp_path / "plots")
    assert [p.name for p in written] == ["table1.png", "table2.png", "reply_metrics.png"]
    for path in written:
        assert path.read_bytes()[:8] == PNG_MAGIC


def test_plots_skip_missing_parts(tmp_path: Path) -> None:
    assert render_plots(build_report({}), tmp_path) == []
    written = render_plots(build_report({"ratings": RATINGS[:1]}), tmp_path)
    assert [p.name for p in written] == ["table1.png"]
