"""The resources reply metrics are scored with, found from the trainer's settings: one place for the CLI and the job.

Every resource is optional: a missing file leaves its metric None (or "unavailable"), so the demo works on a
machine that only has the default artefacts.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emili_trainer.settings import TrainerOptions

__all__ = ["ReplyScorers", "build_scorers", "unmeasurable_gate_metrics"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplyScorers:
    """Keyword arguments of :func:`~emili_trainer.evaluation.metrics.reply_metrics` (None: not available)."""

    embed: Any = None
    vad_lexicon: Any = None
    intensity: Any = None
    corpus_counts: Mapping[str, int] | None = None
    bert_scorer: Any = None
    epitome: Any = None

    def kwargs(self) -> dict[str, Any]:
        return {
            "embed": self.embed,
            "vad_lexicon": self.vad_lexicon,
            "intensity": self.intensity,
            "corpus_counts": self.corpus_counts,
            "bert_scorer": self.bert_scorer,
            "epitome": self.epitome,
        }


def _under(artifacts_dir: Path, path: Path | None) -> Path | None:
    return None if path is None else path if path.is_absolute() else artifacts_dir / path


def build_scorers(options: TrainerOptions, artifacts_dir: Path, *, embeddings: bool = True) -> ReplyScorers:
    """Load what exists: MiniLM (semantic similarity, BERTScore's encoder, EPITOME's features), the distance
    lexicon (``distance_lexicon``, else ``vad_lexicon``), the intensity lexicon, the ED counts and the EPITOME
    classifiers. A configured file that is missing is an error; a default artefact that is missing is skipped."""
    from emili_affect.vad import SentenceTransformerEmbedder, load_lexicon
    from emili_trainer.evaluation.bertscore import BertScorer
    from emili_trainer.evaluation.epitome import load_epitome
    from emili_trainer.evaluation.intensity import load_emotion_intensity
    from emili_trainer.evaluation.metrics import load_corpus_counts

    embed_dir = _under(artifacts_dir, options.embedding_model)
    has_encoder = embeddings and embed_dir is not None and (embed_dir / "config.json").is_file()
    embedder = SentenceTransformerEmbedder(embed_dir) if has_encoder and embed_dir is not None else None
    lexicon_path = _under(artifacts_dir, options.distance_lexicon or options.vad_lexicon)
    if options.distance_lexicon is not None and lexicon_path is not None and not lexicon_path.is_file():
        raise FileNotFoundError(f"distance lexicon not found: {lexicon_path}")
    intensity_path = _under(artifacts_dir, options.intensity_lexicon)
    counts_path = _under(artifacts_dir, options.ed_counts)
    epitome_dir = _under(artifacts_dir, options.epitome_dir)
    epitome = load_epitome(epitome_dir) if epitome_dir is not None else None
    if epitome is not None and embedder is not None and epitome.encoder != embedder.model_id:
        # Features from another encoder would make the levels meaningless.
        log.warning("EPITOME classifiers were trained on %s, not %s: ignored", epitome.encoder, embedder.model_id)
        epitome = None
    bert_scorer = None
    if embedder is not None and options.bertscore:
        bert_scorer = BertScorer(embedder.folder, options.bertscore_layers)
    return ReplyScorers(
        embed=embedder.embed if embedder is not None else None,
        vad_lexicon=load_lexicon(lexicon_path) if lexicon_path is not None and lexicon_path.is_file() else None,
        intensity=load_emotion_intensity(intensity_path) if intensity_path is not None else None,
        corpus_counts=load_corpus_counts(counts_path) if counts_path is not None else None,
        bert_scorer=bert_scorer,
        epitome=epitome,
    )


def unmeasurable_gate_metrics(options: TrainerOptions, artifacts_dir: Path) -> dict[str, str]:
    """The gate metrics (:mod:`~emili_trainer.evaluation.gate_evidence`) an evaluation with these settings cannot
    give, and why. A gate check on one of them fails every candidate, so loops and studies ask first."""
    from emili_trainer.evaluation.epitome import load_epitome

    reasons: dict[str, str] = {}
    epitome_dir = _under(artifacts_dir, options.epitome_dir)
    embed_dir = _under(artifacts_dir, options.embedding_model)
    if epitome_dir is None or load_epitome(epitome_dir) is None:
        reasons["diff_epitome_mean"] = (
            f"no EPITOME classifiers found in {epitome_dir} (`emili eval train-epitome --data DIR` trains them)"
        )
    elif embed_dir is None or not (embed_dir / "config.json").is_file():
        reasons["diff_epitome_mean"] = f"the EPITOME classifiers need the MiniLM embedder, not found in {embed_dir}"
    if options.mmlu_path is None:
        reasons["mmlu_correct"] = "MMLU is not configured: set EMILI_TRAINER__MMLU_PATH to the MMLU data folder"
    elif not options.mmlu_path.exists():
        reasons["mmlu_correct"] = f"the MMLU data is not at EMILI_TRAINER__MMLU_PATH={options.mmlu_path}"
    return reasons
