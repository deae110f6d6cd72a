"""Evaluation commands: reply metrics of a JSONL file of replies, EPITOME training, and a run's report.

``app`` is meant to be mounted under the ``emili`` command; the functions work without Typer too.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import typer

from emili_trainer.evaluation.metrics import ReplyRow, reply_metrics
from emili_trainer.evaluation.report import build_report, render_markdown, render_plots
from emili_trainer.settings import TrainerOptions

__all__ = [
    "DEFAULT_EMBEDDINGS",
    "DEFAULT_LEXICON",
    "ReplyFileError",
    "app",
    "eval_replies",
    "load_report",
    "read_reply_rows",
    "show_report",
    "train_epitome_classifiers",
]

# Under the artifacts folder (EMILI_ARTIFACTS_DIR), where the labeler keeps them.
DEFAULT_LEXICON = Path("labeler/NoVAD_v2013.csv")
DEFAULT_EMBEDDINGS = Path("labeler/all-MiniLM-L6-v2")
RESULT_FILES = ("report.json", "results.json")

app = typer.Typer(help="Evaluation of EMILI's replies and reports of evaluation runs.", no_args_is_help=True)


class ReplyFileError(ValueError):
    """A replies file line that is not a JSON object with a context, a reply and a reference."""


def _context(value: Any, where: str) -> str | list[dict[str, str]]:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    ):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise ReplyFileError(f"{where}: context must be a string or a list of {{role, content}} string messages")


def read_reply_rows(path: Path) -> list[ReplyRow]:
    """Rows of a JSONL file, one ``{"context", "reply", "reference"}`` object a line; blank lines are skipped.

    Raises ReplyFileError naming the file and line of the first bad line.
    """
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ReplyFileError(f"{where}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise ReplyFileError(f"{where}: expected a JSON object, got {type(record).__name__}")
            missing = [k for k in ("context", "reply", "reference") if k not in record]
            if missing:
                raise ReplyFileError(f"{where}: missing field(s) {', '.join(missing)}")
            for key in ("reply", "reference"):
                if not isinstance(record[key], str):
                    raise ReplyFileError(f"{where}: {key} must be a string")
            rows.append(ReplyRow(_context(record["context"], where), record["reply"], record["reference"]))
    return rows


def _settings() -> tuple[TrainerOptions, Path]:
    from emili_core.settings import load_settings
    from emili_trainer.settings import TrainerSettings

    settings = load_settings(TrainerSettings)
    return settings.trainer, settings.artifacts_dir


def eval_replies(
    replies: Path,
    lexicon: Path | None = None,
    intensity: Path | None = None,
    embeddings: bool = True,
    artifacts_dir: Path | None = None,
    *,
    ed_counts: Path | None = None,
    epitome_dir: Path | None = None,
    bertscore: bool = True,
) -> dict[str, Any]:
    """reply_metrics of a replies file, with the resources the trainer's settings name (see ``build_scorers``).

    Arguments override the settings. With ``artifacts_dir`` the settings are not read: the defaults apply under
    that folder (the Warriner norms and MiniLM, when present).
    """
    from emili_trainer.evaluation.scorers import build_scorers

    rows = read_reply_rows(replies)
    options, artifacts = (TrainerOptions(), artifacts_dir) if artifacts_dir is not None else _settings()
    overrides: dict[str, Any] = {"bertscore": options.bertscore and bertscore}
    for key, value in (
        ("distance_lexicon", lexicon),
        ("intensity_lexicon", intensity),
        ("ed_counts", ed_counts),
        ("epitome_dir", epitome_dir),
    ):
        if value is not None:
            overrides[key] = value.absolute()
    scorers = build_scorers(options.model_copy(update=overrides), artifacts, embeddings=embeddings)
    result = reply_metrics(rows, **scorers.kwargs())
    result["embeddings"] = scorers.embed is not None
    return result


@app.command("eval-replies")
def eval_replies_command(
    replies: Annotated[
        Path, typer.Option(exists=True, dir_okay=False, help="JSONL: context, reply, reference per line.")
    ],
    lexicon: Annotated[
        Path | None,
        typer.Option(
            exists=True, dir_okay=False, help="VAD lexicon of the distances (Warriner, NRC-VAD v1/v2.1; EmPO: v1)."
        ),
    ] = None,
    intensity: Annotated[
        Path | None, typer.Option(exists=True, dir_okay=False, help="NRC Emotion Intensity Lexicon (TSV).")
    ] = None,
    ed_counts: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, help="EmpatheticDialogues train+valid counts JSON for NIDF."),
    ] = None,
    epitome: Annotated[
        Path | None, typer.Option(file_okay=False, help="Folder of the EPITOME classifiers (train-epitome).")
    ] = None,
    embeddings: Annotated[bool, typer.Option(help="MiniLM: semantic similarity, BERTScore, DIFF-EPITOME.")] = True,
    bertscore: Annotated[bool, typer.Option(help="BERTScore with the local MiniLM encoder.")] = True,
) -> None:
    """Reply metrics of a replies file, printed as one JSON object. Unset options come from the trainer's settings."""
    try:
        result = eval_replies(
            replies, lexicon, intensity, embeddings, ed_counts=ed_counts, epitome_dir=epitome, bertscore=bertscore
        )
    except (ReplyFileError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise typer.Exit(2) from None
    print(json.dumps(result))


def train_epitome_classifiers(data: Path, out: Path | None = None) -> dict[str, Any]:
    """Train the EPITOME classifiers on ``data`` (train/val/test CSVs) with MiniLM; save them in ``out``
    (default: the configured epitome_dir). Returns the manifest (per-dimension test macro-F1)."""
    from emili_affect.vad import SentenceTransformerEmbedder
    from emili_trainer.evaluation.epitome import train_epitome

    missing = [name for name in ("train.csv", "val.csv", "test.csv") if not (data / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{data} lacks the EPITOME split(s) {', '.join(missing)}")
    options, artifacts = _settings()
    encoder = artifacts / options.embedding_model
    if not (encoder / "config.json").is_file():
        raise FileNotFoundError(f"the embedding model is missing at {encoder}: run `make artifacts`")
    embedder = SentenceTransformerEmbedder(encoder)
    classifiers = train_epitome(data, embedder.embed, embedder.model_id)
    folder = out if out is not None else artifacts / options.epitome_dir
    classifiers.save(folder)
    return dict(classifiers.manifest) | {"saved_to": str(folder)}


@app.command("train-epitome")
def train_epitome_command(
    data: Annotated[
        Path, typer.Option(exists=True, file_okay=False, help="EPITOME folder: train.csv, val.csv, test.csv.")
    ],
    out: Annotated[
        Path | None, typer.Option(file_okay=False, help="Where to save; default: the artefacts' trainer/epitome.")
    ] = None,
) -> None:
    """Train the project's EPITOME classifiers (for DIFF-EPITOME) and print their manifest."""
    try:
        manifest = train_epitome_classifiers(data, out)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise typer.Exit(2) from None
    print(json.dumps(manifest, indent=2))


def load_report(path: Path) -> dict[str, Any] | str:
    """A report from a run's JSON file (results or report), or from a run folder's report.md or JSON file.

    A folder's ``report.md`` is returned as text; otherwise its ``report.json`` or ``results.json`` is built.
    """
    if path.is_dir():
        if (path / "report.md").is_file():
            return (path / "report.md").read_text(encoding="utf-8")
        found = [path / name for name in RESULT_FILES if (path / name).is_file()]
        if not found:
            raise FileNotFoundError(f"{path} has no report.md, {' or '.join(RESULT_FILES)}")
        path = found[0]
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: expected a JSON object")
    return build_report(data)


def show_report(path: Path, out_dir: Path | None = None, console: Any = None) -> str:
    """Print a run's report as rich Markdown; with ``out_dir``, also write report.md, report.json and the plots."""
    from rich.console import Console
    from rich.markdown import Markdown

    loaded = load_report(path)
    markdown = loaded if isinstance(loaded, str) else render_markdown(loaded)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "report.md").write_text(markdown, encoding="utf-8")
        if not isinstance(loaded, str):
            (out_dir / "report.json").write_text(json.dumps(loaded, indent=2), encoding="utf-8")
            render_plots(loaded, out_dir)
    (console or Console()).print(Markdown(markdown))
    return markdown


@app.command("report")
def report_command(
    run: Annotated[Path, typer.Argument(exists=True, help="A run's results/report JSON, or its folder.")],
    out: Annotated[Path | None, typer.Option(file_okay=False, help="Write report.md, report.json, PNGs here.")] = None,
) -> None:
    """Show a run's evaluation report."""
    try:
        show_report(run, out)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise typer.Exit(2) from None
