"""The evaluation gate's online items: the contract between the labeler, which computes them from each arm's
labelled sessions (``emili_labeler.jobs.arm_gate_items``), and the trainer, which turns them into the gate's
evidence (``emili_trainer.evaluation.gate_evidence``).

Per arm and origin ("real", "synthetic"): ``sessions`` (a count), the items of every metric, and for each metric
with one item per session (:data:`PER_SESSION_METRICS`) the user of each item (:func:`users_key`), so sessions of
the same simulated user on two arms can be paired.
"""

from __future__ import annotations

__all__ = ["METRICS", "PER_SESSION_METRICS", "SIGNAL_METRIC", "users_key"]

# Gold Δv from the surveys; the face's mean change after a reply; the share of the session's read replies whose
# reaction was negative (one item per session: a person's replies are not independent items).
PER_SESSION_METRICS = ("delta_v", "reaction", "negative_reaction_rate")
METRICS = (*PER_SESSION_METRICS, "negative_reaction")  # negative_reaction: one 0/1 item per reply read.


def users_key(metric: str) -> str:
    return f"{metric}_users"


# The gate's evidence on the pipeline's own sessions (the labeler's label step): per user, the mean facial reaction
# (signal) against the mean gold Δv of the surveys (outcome), for an ``associated`` check: does the feedback the loop
# learns from predict what people report?
SIGNAL_METRIC = "reaction_predicts_delta_v"
