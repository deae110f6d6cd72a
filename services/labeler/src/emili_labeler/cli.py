"""``emili labeler ...``: out-of-lexicon quality and text scoring from the command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from emili_affect.vad import (
    LocalEmbeddingCache,
    SentenceTransformerEmbedder,
    evaluate_oov,
    load_affect_tables,
    load_lexicon,
)
from emili_core.settings import load_settings
from emili_labeler.settings import LabelerSettings

app = typer.Typer(help="VAD labels and datasets.", no_args_is_help=True)


@app.command("eval-oov")
def eval_oov(
    lexicon: Annotated[Path, typer.Option(exists=True, dir_okay=False, help="NRC-VAD v1/v2.1 or Warriner file.")],
    holdout: Annotated[float, typer.Option(min=0.01, max=0.9, help="Share of words held out.")] = 0.1,
    seed: Annotated[int, typer.Option(help="Seed of the held-out split.")] = 0,
    lexicon_format: Annotated[
        str | None, typer.Option("--format", help="nrc_v1, nrc_v2 or warriner; default: detected.")
    ] = None,
) -> None:
    """Pearson r per dimension of each out-of-lexicon method on held-out lexicon words (one JSON object)."""
    settings = load_settings(LabelerSettings)
    options = settings.labeler
    embedder = SentenceTransformerEmbedder(settings.artifact(options.embedding_model))
    loaded = load_lexicon(lexicon, lexicon_format)
    result = evaluate_oov(
        loaded,
        embedder,
        holdout,
        seed,
        cache=LocalEmbeddingCache(settings.artifacts_dir.parent / "cache" / "embeddings"),
        beta=options.beta,
        k=options.top_k,
        alpha=options.ridge_alpha,
        affect_tables=load_affect_tables(
            [settings.artifact(p) for p in options.affect_resources], exclude_sha256=[loaded.sha256]
        ),
    )
    print(json.dumps(result))


@app.command()
def score(texts: Annotated[list[str], typer.Argument(help="Texts to score.")]) -> None:
    """VAD of each text with the configured lexicon and out-of-lexicon method (JSON lines)."""
    from emili_labeler.runtime import build_runtime

    runtime = build_runtime(load_settings(LabelerSettings))
    for result in runtime.scorer.score_batch(texts):
        print(json.dumps(result.to_dict()))


@app.command()
def table() -> None:
    """The paper's Table 2 over every recorded session: mean Delta V/A/D per model arm with 95% CIs (JSON)."""
    from emili_labeler.jobs import delta_table
    from emili_labeler.runtime import build_runtime

    print(json.dumps(delta_table(build_runtime(load_settings(LabelerSettings))), indent=2))
