"""Evaluation of fine-tuned vs base models: reply metrics, reference perplexity, MMLU, the report.

Heavy dependencies (torch, lm-eval, matplotlib) are imported inside the functions that need them.
"""

from emili_trainer.evaluation.intensity import EmotionIntensity, load_emotion_intensity
from emili_trainer.evaluation.metrics import ReplyRow, reference_perplexity, reply_metrics, word_counts
from emili_trainer.evaluation.mmlu import SKIP_MESSAGE, run_mmlu
from emili_trainer.evaluation.paired import paired_report
from emili_trainer.evaluation.report import build_report, ratings_table, render_markdown, render_plots

__all__ = [
    "SKIP_MESSAGE",
    "EmotionIntensity",
    "ReplyRow",
    "build_report",
    "load_emotion_intensity",
    "paired_report",
    "ratings_table",
    "reference_perplexity",
    "render_markdown",
    "render_plots",
    "reply_metrics",
    "run_mmlu",
    "word_counts",
]
