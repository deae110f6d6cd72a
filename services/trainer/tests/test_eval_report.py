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
    assert list(table) == ["adapter:sft-1 · real", "base · real"]
    base = table["base · real"]
    assert (base["n"], base["arm"], base["origin"], base["real"], base["synthetic"]) == (2, "base", "real", 2, 0)
    assert base["empathy"]["mean"] == pytest.approx(4.0)
    low, high = base["empathy"]["ci95"]
    assert 3.0 <= low <= 4.0 <= high <= 5.0
    assert base["fluency"]["ci95"] == pytest.approx([5.0, 5.0])  # No spread, no interval.
    assert table["adapter:sft-1 · real"]["relevance"]["mean"] == pytest.approx(5.0)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"model_arm": "base", "empathy": 6, "relevance": 4, "fluency": 5}, "rating 1: empathy"),
        ({"model_arm": "base", "empathy": 3, "relevance": True, "fluency": 5}, "rating 1: relevance"),
        ({"model_arm": "base", "empathy": 3, "relevance": 4}, "rating 1: fluency"),
        ({"empathy": 3, "relevance": 4, "fluency": 5}, "rating 1: model_arm"),
        ({"model_arm": "base", "empathy": 3, "relevance": 4, "fluency": 5, "synthetic": "yes"}, "rating 1: synthetic"),
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
    assert "## Table 1: human ratings (Likert" in markdown  # Every rated session was real.
    assert "| base | real | 2 | 4.00 [" in markdown  # Table 1 row: origin, n and mean empathy with its CI.
    assert "| adapter:sft-1 | real | 1 | 4.00 [4.00, 4.00] | 5.00 [5.00, 5.00] |" in markdown
    assert "Rated sessions: 3 real, 0 synthetic (simulated users)." in markdown
    assert "Lexicon: warriner-2013; sessions: 3 (synthetic/real split not recorded)." in markdown
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
    mmlu = {
        "base": {"acc": 0.5881, "acc_stderr": 0.004, "n_subjects": 57, "n_questions": 14042, "wall_seconds": 61.4},
        "adapter:sft-1": {"skipped": "no GPU"},
    }
    markdown = render_markdown(build_report({"mmlu": mmlu}))
    assert "| base | 0.588 | 0.004 | 57 | 14042 | 61 |" in markdown
    assert "| adapter:sft-1 | skipped: no GPU | n/a | n/a | n/a | n/a |" in markdown
    assert "A subset of MMLU" not in markdown
    assert NO_RATINGS in markdown
    subset = {"base": {"acc": 0.25, "acc_stderr": 0.02, "n_subjects": 3, "n_questions": 300}}
    assert "A subset of MMLU's 57 subjects" in render_markdown(build_report({"mmlu": subset}))


def test_plots_are_png_files(tmp_path: Path) -> None:
    written = render_plots(build_report(_full_results()), tmp_path / "plots")
    assert [p.name for p in written] == ["table1.png", "table2.png", "reply_metrics.png"]
    for path in written:
        assert path.read_bytes()[:8] == PNG_MAGIC


def test_plots_skip_missing_parts(tmp_path: Path) -> None:
    assert render_plots(build_report({}), tmp_path) == []
    written = render_plots(build_report({"ratings": RATINGS[:1]}), tmp_path)
    assert [p.name for p in written] == ["table1.png"]


SYNTHETIC_RATINGS = [
    {"model_arm": "base", "empathy": 1, "relevance": 1, "fluency": 1, "synthetic": True},
    {"model_arm": "base", "empathy": 2, "relevance": 2, "fluency": 2, "synthetic": True},
]


def test_synthetic_and_real_ratings_are_never_pooled_unless_asked() -> None:
    table = ratings_table([*RATINGS, *SYNTHETIC_RATINGS], samples=200)
    assert set(table) == {"adapter:sft-1 · real", "base · real", "base · synthetic"}
    assert table["base · real"]["empathy"]["mean"] == pytest.approx(4.0)  # (3 + 5) / 2: no simulated rating.
    assert table["base · synthetic"]["empathy"]["mean"] == pytest.approx(1.5)
    assert (table["base · synthetic"]["real"], table["base · synthetic"]["synthetic"]) == (0, 2)
    pooled = ratings_table([*RATINGS, *SYNTHETIC_RATINGS], samples=200, pool_synthetic=True)
    assert set(pooled) == {"adapter:sft-1", "base"}
    base = pooled["base"]
    assert (base["origin"], base["n"], base["real"], base["synthetic"]) == ("pooled", 4, 2, 2)
    assert base["empathy"]["mean"] == pytest.approx((3 + 5 + 1 + 2) / 4)


def test_a_simulator_only_report_never_says_human() -> None:
    report = build_report({"ratings": SYNTHETIC_RATINGS})
    assert report["sessions"]["ratings"] == {"real": 0, "synthetic": 2}
    assert (report["synthetic_sessions"], report["real_sessions"], report["pooled_synthetic"]) == (2, 0, False)
    markdown = render_markdown(report)
    assert "human" not in markdown.lower()
    assert "simulated-user ratings, synthetic sessions only (no person rated)" in markdown
    assert "| base | synthetic | 2 | 1.50 [" in markdown
    assert "Rated sessions: 0 real, 2 synthetic (simulated users)." in markdown
    assert json.loads(json.dumps(report))["synthetic_sessions"] == 2


def test_mixed_report_states_counts_and_pooling() -> None:
    mixed = [*RATINGS, *SYNTHETIC_RATINGS]
    apart = render_markdown(build_report({"ratings": mixed}))
    assert "ratings from human and simulated users, in separate rows" in apart
    assert (
        "Rated sessions: 3 real, 2 synthetic (simulated users). Synthetic and real sessions are never pooled" in apart
    )
    pooled_report = build_report({"ratings": mixed, "pool_synthetic": True})
    assert pooled_report["pooled_synthetic"] is True
    pooled = render_markdown(pooled_report)
    assert "pooled as asked" in pooled and "| base | pooled | 4 |" in pooled
    assert build_report(pooled_report) == pooled_report


def test_delta_table_and_context_counts_are_shown() -> None:
    delta = {**_delta_table(), "synthetic_sessions": 3, "real_sessions": 0}
    report = build_report({**_full_results(), "delta_table": delta, "context_sessions": {"real": 1, "synthetic": 4}})
    assert report["sessions"]["delta_table"] == {"real": 0, "synthetic": 3}
    assert report["sessions"]["contexts"] == {"real": 1, "synthetic": 4}
    assert report["synthetic_sessions"] == 4  # The most of any part.
    markdown = render_markdown(report)
    assert "sessions: 3 (0 real, 3 synthetic (simulated users))." in markdown
    assert "Contexts from recorded sessions: 1 real, 4 synthetic (simulated users)." in markdown


def test_paired_section() -> None:
    paired = {
        "empathetic": {
            "seeds": [0, 1],
            "n_contexts": 40,
            "samples": 200,
            "method": "paired bootstrap over contexts",
            "metrics": {
                "bleu": {
                    "label": "BLEU",
                    "arms": {"base": {"mean": 1.0, "sd": 0.5}, "sft": {"mean": 2.5, "sd": 0.25}},
                    "vs_base": {"sft": {"diff": 1.5, "ci95": [0.5, 2.5], "p_value": 0.01}},
                }
            },
        }
    }
    markdown = render_markdown(build_report({"paired": paired}))
    assert "### Contexts: empathetic" in markdown
    assert "Contexts: 40; seeds: 0, 1;" in markdown
    assert "| BLEU | 1.000 ± 0.500 | 2.500 ± 0.250; diff 1.500 [0.500, 2.500], p=0.010 |" in markdown
