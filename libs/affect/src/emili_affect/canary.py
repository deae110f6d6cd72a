"""The canary's decision rule: after one more look at a candidate's and the production arm's sessions, is the
candidate still running, promoted or rolled back?

One rule for every canary: the gateway's live one (``emili_gateway.canary``, a share of a study's participants) and
the loop simulation study's offline one (``emili_pipeline.study_sim``, simulated users per arm), so the study judges
candidates as the product would.

- **Harm** on any outcome: its always-valid sequential p-value (mixture SPRT, :func:`emili_affect.stats.msprt_compare`;
  the running minimum across looks) under ``alpha`` / number of outcomes, once both arms have ``min_sessions``
  sessions of that outcome (``max_sessions`` if fewer): **roll back**. The test estimates the variances from the
  data; on 2 or 3 sessions they can be near 0, so any gap would look certain.
- ``max_sessions`` rated in each arm with no harm: **promote** when the mean rating is shown not worse than
  ``margin`` (a one-sided ``1 - alpha`` bound of the difference, Student's t on Welch's degrees of freedom: this
  analysis happens once, at the planned size, so it needs no sequential correction); otherwise **roll back**.
  Finished sessions whose outcomes are not read yet (``labels_pending``) hold a promotion back, never a harm decision.

The first outcome compared is the rating; the others guard against harm only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from emili_affect.stats import msprt_compare

CanaryState = Literal["running", "promoted", "rolled_back"]
RATED_OUTCOMES = ("rating", "completed")  # What the study's own records say: the rating and whether one was given.
OUTCOMES = (*RATED_OUTCOMES, "delta_v", "positive_reaction")  # With the labeler's session labels.
# The mixture scale per outcome: the size of difference the test is tuned to detect, in the outcome's units (rating
# points; shares of sessions completed or of replies reacted to positively; valence on the 0-1 scale).
DEFAULT_TAU: Mapping[str, float] = {"rating": 0.5, "completed": 0.15, "delta_v": 0.05, "positive_reaction": 0.15}


def check_tau(tau: Mapping[str, float]) -> dict[str, float]:
    """``tau`` with the outcomes it leaves out at their defaults; ValueError on an unknown outcome or a scale that
    is not positive."""
    merged = {**DEFAULT_TAU, **tau}
    if unknown := set(merged) - set(DEFAULT_TAU):
        raise ValueError(f"unknown canary outcomes {sorted(unknown)}; known: {sorted(DEFAULT_TAU)}")
    if bad := [k for k, v in merged.items() if not v > 0]:
        raise ValueError(f"tau must be positive for {bad}")
    return merged


@dataclass(frozen=True)
class CanaryRule:
    max_sessions: int = 100  # Rated sessions per arm before promoting (if no harm): the planned size.
    min_sessions: int = 10  # Sessions per arm before harm may be called (module docstring).
    alpha: float = 0.05  # Shared by the outcomes (Bonferroni) for harm; one-sided level of the rating's bound.
    margin: float = 0.25  # Rating points the candidate may lose and still be promoted.
    tau: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_TAU))

    def __post_init__(self) -> None:
        if self.max_sessions < 2 or self.min_sessions < 2:
            raise ValueError("a canary needs at least 2 sessions per arm to estimate a variance")
        if not 0 < self.alpha < 0.5 or self.margin < 0:
            raise ValueError(f"alpha must be in (0, 0.5) and the margin not negative, not {self.alpha}, {self.margin}")
        object.__setattr__(self, "tau", check_tau(self.tau))

    def harm_burn_in(self) -> int:
        return min(self.min_sessions, self.max_sessions)


@dataclass(frozen=True)
class OutcomeLook:
    """One comparison of the candidate with the production arm, on one outcome."""

    outcome: str
    n_candidate: int
    n_production: int
    difference: float | None  # mean(candidate) - mean(production)
    p_harm: float  # Running minimum across looks (always valid).
    ci: tuple[float, float] | None  # Always valid, at 1 - alpha.
    lower_bound: float | None = None  # One-sided 1 - alpha bound of the difference, for the planned end.


@dataclass(frozen=True)
class Verdict:
    state: CanaryState
    reason: str
    looks: tuple[OutcomeLook, ...]


def judge(
    rule: CanaryRule,
    candidate: Mapping[str, Sequence[float]],
    production: Mapping[str, Sequence[float]],
    outcomes: Sequence[str] = OUTCOMES,
    previous_p_harm: Mapping[str, float] | None = None,
    labels_pending: int = 0,
) -> Verdict:
    """The canary after one more look at every outcome's values per arm. ``previous_p_harm``: each outcome's running
    minimum p-value from the earlier looks; ``labels_pending``: finished sessions whose outcomes are not read yet."""
    previous = previous_p_harm or {}
    looks = []
    harmed = []
    for outcome in outcomes:
        compared = msprt_compare(
            candidate.get(outcome, []), production.get(outcome, []), tau=rule.tau[outcome], alpha=rule.alpha
        )
        burnt_in = min(compared.n_candidate, compared.n_baseline) >= rule.harm_burn_in()
        p_harm = min(previous.get(outcome, 1.0), compared.p_harm if burnt_in else 1.0)
        finite = not math.isnan(compared.difference)
        looks.append(
            OutcomeLook(
                outcome=outcome,
                n_candidate=compared.n_candidate,
                n_production=compared.n_baseline,
                difference=compared.difference if finite else None,
                p_harm=p_harm,
                ci=compared.ci if finite else None,
                lower_bound=compared.fixed_size_lower_bound(rule.alpha) if finite else None,
            )
        )
        if p_harm < rule.alpha / len(outcomes):
            harmed.append(f"{outcome} (difference {compared.difference:+.3f}, p = {p_harm:.4f})")
    if harmed:
        return Verdict("rolled_back", f"harm: the candidate did worse on {', '.join(harmed)}", tuple(looks))
    rating = looks[0]
    if min(rating.n_candidate, rating.n_production) < rule.max_sessions or labels_pending:
        return Verdict("running", "", tuple(looks))
    if rating.lower_bound is not None and rating.lower_bound > -rule.margin:
        reason = (
            f"no harm after {rating.n_candidate} rated sessions; rating difference {rating.difference:+.3f}, "
            f"worst plausible {rating.lower_bound:+.3f}, within the margin {rule.margin}"
        )
        return Verdict("promoted", reason, tuple(looks))
    return Verdict("rolled_back", f"not shown to be as good within {rule.margin} rating points", tuple(looks))
