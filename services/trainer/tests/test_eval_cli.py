"""The evaluation commands: eval-replies on JSONL files (errors name the line) and the report helper."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from emili_trainer.evaluation.cli import (
    DEFAULT_LEXICON,
    ReplyFileError,
    app,
    eval_replies,
    read_reply_rows,
    show_report,
)
from emili_trainer.evaluation.mmlu import SKIP_MESSAGE

runner = CliRunner()
WARRINER = "Word,V.Mean.Sum,A.Mean.Sum,D.Mean.Sum\nhappy,8.47,6.05,7.21\nsad,2.1,3.49,3.84\nhard,4.0,5.0,5.0\n"


def _write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _good_lines() -> list[str]:
    return [
        json.dumps({"context": "I am sad.", "reply": "That sounds hard.", "reference": "Oh no, that sounds hard."}),
        "",
        json.dumps(
            {
                "context": [{"role": "system", "content": "be kind"}, {"role": "user", "content": "I am happy"}],
                "reply": "So happy for you!",
                "reference": "Happy for you.",
            }
        ),
    ]


def test_eval_replies_prints_one_json_object(tmp_path: Path) -> None:
    replies = _write_jsonl(tmp_path / "replies.jsonl", _good_lines())
    lexicon = tmp_path / "warriner.csv"
    lexicon.write_text(WARRINER, encoding="utf-8")
    result = runner.invoke(
        app, ["eval-replies", "--replies", str(replies), "--lexicon", str(lexicon), "--no-embeddings"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    for key in ("n", "bleu", "distinct_1", "distinct_2", "mean_length_chars", "unique_start_words", "unique_replies"):
        assert key in data
    assert data["n"] == 2
    assert data["unique_start_words"] == 2
    assert data["semantic_similarity"] is None and data["embeddings"] is False
    # sad vs hard, happy vs happy: both pairs have lexicon words.
    assert data["vad_distance"]["lexicon"] == "warriner-2013"
    assert data["vad_distance"]["pairs_scored"] == 2


def test_eval_replies_prints_the_empo_metrics(tmp_path: Path) -> None:
    replies = _write_jsonl(tmp_path / "replies.jsonl", _good_lines())
    lexicon = tmp_path / "warriner.csv"
    lexicon.write_text(WARRINER, encoding="utf-8")
    counts = tmp_path / "counts.json"
    counts.write_text(json.dumps({"word_counts": {"That": 100, "sounds": 10, "hard": 1, ".": 100}}), encoding="utf-8")
    intensity = tmp_path / "intensity.txt"
    intensity.write_text("sad\tsadness\t0.8\nhard\tsadness\t0.3\nhappy\tjoy\t0.7\n", encoding="utf-8")
    args = ["eval-replies", "--replies", str(replies), "--lexicon", str(lexicon), "--no-embeddings"]
    args += ["--ed-counts", str(counts), "--intensity", str(intensity), "--epitome", str(tmp_path / "none")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["nidf_corpus"] == "given"
    # "That sounds hard." -> {That 0, sounds 0.5, hard 1, . 0} = 0.375; "So happy for you!" -> 5 unseen tokens = 1.
    assert data["nidf"] == pytest.approx((0.375 + 1.0) / 2)
    # sad 0.8 vs hard 0.3; happy 0.7 vs happy 0.7 (the context is the last user turn, not the system prompt).
    assert data["intensity_distance"] == pytest.approx((0.5 + 0.0) / 2)
    # Openings "that sounds hard" and "so happy for you" share nothing: 8 nodes for 8 words (roots included).
    assert data["response_tries"]["compression"] == pytest.approx(1.0)
    assert data["bertscore_f1"] is None
    assert data["diff_epitome"]["status"] == "unavailable"
    assert data["diff_epitome"]["train_command"].startswith("emili eval train-epitome")


def test_train_epitome_names_the_missing_split(tmp_path: Path) -> None:
    (tmp_path / "train.csv").write_text("seeker_post,response_post\n", encoding="utf-8")
    result = runner.invoke(app, ["train-epitome", "--data", str(tmp_path)])
    assert result.exit_code == 2
    assert "val.csv, test.csv" in result.stderr


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("{not json", "replies.jsonl:3: not valid JSON"),
        (json.dumps({"context": "hi", "reply": "hey"}), "replies.jsonl:3: missing field(s) reference"),
        (json.dumps(["context", "reply", "reference"]), "replies.jsonl:3: expected a JSON object"),
        (json.dumps({"context": 5, "reply": "a", "reference": "b"}), "replies.jsonl:3: context must be"),
        (json.dumps({"context": "a", "reply": None, "reference": "b"}), "replies.jsonl:3: reply must be a string"),
    ],
)
def test_eval_replies_names_the_bad_line(tmp_path: Path, bad_line: str, message: str) -> None:
    replies = _write_jsonl(tmp_path / "replies.jsonl", [_good_lines()[0], "   ", bad_line, _good_lines()[2]])
    with pytest.raises(ReplyFileError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_reply_rows(replies)
    lexicon = tmp_path / "warriner.csv"
    lexicon.write_text(WARRINER, encoding="utf-8")
    result = runner.invoke(
        app, ["eval-replies", "--replies", str(replies), "--lexicon", str(lexicon), "--no-embeddings"]
    )
    assert result.exit_code == 2
    assert message in result.stderr
    assert result.stdout == ""


def test_eval_replies_uses_the_default_lexicon_in_the_artifacts(tmp_path: Path) -> None:
    replies = _write_jsonl(tmp_path / "replies.jsonl", _good_lines())
    (tmp_path / DEFAULT_LEXICON).parent.mkdir(parents=True)
    (tmp_path / DEFAULT_LEXICON).write_text(WARRINER, encoding="utf-8")
    result = eval_replies(replies, embeddings=True, artifacts_dir=tmp_path)  # No MiniLM folder there.
    assert result["vad_distance"]["lexicon"] == "warriner-2013"
    assert result["embeddings"] is False
    assert eval_replies(replies, embeddings=False, artifacts_dir=tmp_path / "none")["vad_distance"]["lexicon"] is None


def _results() -> dict[str, object]:
    return {
        "title": "Smoke run",
        "ratings": [{"model_arm": "base", "empathy": 4, "relevance": 4, "fluency": 5}],
        "mmlu": {"skipped": SKIP_MESSAGE},
    }


def test_show_report_prints_and_writes(tmp_path: Path) -> None:
    run = tmp_path / "results.json"
    run.write_text(json.dumps(_results()), encoding="utf-8")
    buffer = io.StringIO()
    markdown = show_report(run, out_dir=tmp_path / "out", console=Console(file=buffer, width=160))
    assert "Smoke run" in buffer.getvalue()
    assert "No Delta VAD table" in markdown
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["report.json", "report.md", "table1.png"]  # No reply metrics: no reply-metrics plot.
    # A run folder with report.md is shown as it is.
    again = show_report(tmp_path / "out", console=Console(file=io.StringIO()))
    assert again == markdown


def test_report_command(tmp_path: Path) -> None:
    (tmp_path / "results.json").write_text(json.dumps(_results()), encoding="utf-8")
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "Smoke run" in result.stdout
    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(app, ["report", str(empty)])
    assert result.exit_code == 2
    assert "has no report.md" in result.stderr
