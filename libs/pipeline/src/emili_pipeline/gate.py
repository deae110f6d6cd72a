"""The evaluation gate: what a candidate model must show against the production arm before anyone talks to it.

The policy is data (the shipped one is ``emili_pipeline/data/gate.yaml``): each check names a metric of the
evidence, which way is better, the kind of comparison and its margin, and the sample size below which it cannot
pass. Evidence is per item: for offline metrics the same contexts answered by both arms (paired), for online ones
the sessions of each arm (independent). Every comparison is a bootstrap confidence interval of the difference
candidate - baseline, widened to Student's t so that it keeps its level on a few items
(:func:`emili_affect.stats.bootstrap_difference_ci`):

- ``non_inferior``: passes when the interval excludes a loss bigger than ``margin`` (in the metric's units);
- ``superior``: passes when the interval excludes no gain (it lies wholly on the better side of 0);
- ``within``: passes when the candidate's mean lies in [``low``, ``high``] (e.g. reply length) and, with
  ``max_outside``, at most that share of its items lies outside (a mean hides empty replies among long ones);
- ``associated``: a check of the data the candidate learned from, not of the candidate. Its evidence pairs, per
  item, a signal (the ``candidate`` side, e.g. a user's mean facial reaction) with an outcome people reported (the
  ``baseline`` side, e.g. their surveys' valence change); it passes when the signal predicts the outcome: Spearman's
  rank correlation above 0 by a one-sided permutation test at ``(1 - level) / 2``, the error a ``superior`` check
  allows (:func:`emili_affect.stats.association_test`). With ``blocks_of``, the items are compared within blocks of
  that many with a similar ``covariate`` (carried by the evidence, e.g. the pre-chat survey's valence), because a
  common cause of both sides (how a person felt before the chat moves both their face's changes and their Δv) makes
  an unrelated signal look predictive. A candidate trained on feedback that predicts nothing people report may
  still be better by chance (e.g. shorter replies), but the loop has no reason to credit the feedback for it, and
  the check fails it about 97.5% of the time whatever the candidate does (exactly, when the signal is unrelated to
  the outcome given the blocks; users of similar but unequal covariate leak a little of a strong common cause).

A check with fewer than ``min_n`` items fails ("not enough evidence"), never passes by default; the verdict
passes only when every check does. The verdict keeps each check's estimate, interval and n, so a decision can be
traced back to its numbers.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from emili_affect.stats import association_test, bootstrap_difference_ci, covariate_blocks

SHIPPED = Path(__file__).resolve().parent / "data" / "gate.yaml"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GateCheck(_Strict):
    name: str = Field(min_length=1)
    metric: str = Field(min_length=1)  # A key of the evidence.
    kind: Literal["non_inferior", "superior", "within", "associated"]
    direction: Literal["higher", "lower"] = "higher"  # Which way is better (not used by "within").
    margin: float = Field(0.0, ge=0)
    low: float | None = None
    high: float | None = None
    min_n: int = Field(10, ge=1)
    # "associated": compare within blocks of this many items of similar covariate (None: all items as one).
    blocks_of: int | None = Field(None, ge=2)
    # "within": the most share of the candidate's items allowed outside [low, high] (None: only the mean is checked).
    max_outside: float | None = Field(None, ge=0, le=1)
    # A comparison's test: True requires paired evidence (the same items or users on both arms), False requires
    # independent arms; None takes the evidence as it comes. Evidence of the other kind fails the check.
    paired: bool | None = None

    @model_validator(mode="after")
    def _bounds(self) -> GateCheck:
        if self.kind == "within" and (self.low is None or self.high is None or self.low > self.high):
            raise ValueError(f"check {self.name}: 'within' needs low <= high")
        if self.kind != "within" and self.min_n < 2:
            raise ValueError(f"check {self.name}: a comparison needs min_n >= 2 (one item has no spread to test)")
        if self.kind == "associated" and self.min_n < 3:
            raise ValueError(f"check {self.name}: an association needs min_n >= 3 (two points always line up)")
        if self.blocks_of is not None and self.kind != "associated":
            raise ValueError(f"check {self.name}: blocks_of is for 'associated' checks")
        if self.max_outside is not None and self.kind != "within":
            raise ValueError(f"check {self.name}: max_outside is for 'within' checks")
        if self.paired is not None and self.kind not in ("non_inferior", "superior"):
            raise ValueError(f"check {self.name}: paired is for comparisons ('non_inferior', 'superior')")
        if self.kind == "associated" and (self.direction != "higher" or self.margin != 0):
            raise ValueError(f"check {self.name}: an association is tested one way (higher), with no margin")
        return self


class GatePolicy(_Strict):
    name: str = Field(min_length=1)
    level: float = Field(0.95, gt=0.5, lt=1)  # Confidence level of every interval.
    bootstrap_samples: int = Field(2000, ge=100, le=100_000)
    seed: int = 0
    checks: list[GateCheck] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> GatePolicy:
        names = [c.name for c in self.checks]
        if len(set(names)) != len(names):
            raise ValueError("check names must be unique")
        # A permutation p-value is never below 1 / (resamples + 1): fewer and an association could never pass.
        if any(c.kind == "associated" for c in self.checks) and (self.bootstrap_samples + 1) * (1 - self.level) / 2 < 1:
            raise ValueError(
                f"bootstrap_samples {self.bootstrap_samples} is too few for an association at level {self.level}: "
                f"its smallest p-value would be above {(1 - self.level) / 2:.3g}"
            )
        return self


def load_policy(path: Path | str = SHIPPED) -> GatePolicy:
    """Read a gate policy; a malformed one raises ValueError naming what is wrong."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"cannot read the gate policy {path}: {exc}") from exc
    return GatePolicy.model_validate(raw.get("gate", raw) if isinstance(raw, dict) else raw)


@dataclass(frozen=True)
class Evidence:
    """One metric's items: ``paired`` when candidate[i] and baseline[i] answer the same context."""

    candidate: Sequence[float]
    baseline: Sequence[float] = ()
    paired: bool = False
    # Why there are no items, when the evaluation said (e.g. "no EPITOME classifiers found"): the check's reason.
    missing: str | None = None
    # Per item, what an "associated" check with ``blocks_of`` blocks by (e.g. the pre-chat survey's valence).
    covariate: Sequence[float] = ()


def evidence_from_json(data: Mapping[str, Any]) -> dict[str, Evidence]:
    """Evidence as the evaluation step stores it (``gate_evidence`` of its outputs): ``{metric: {"candidate":
    [...], "baseline": [...], "paired": bool}}``; a malformed entry raises ValueError naming the metric."""
    evidence: dict[str, Evidence] = {}
    for metric, item in data.items():
        try:
            evidence[metric] = Evidence(
                candidate=[float(v) for v in item["candidate"]],
                baseline=[float(v) for v in item.get("baseline", ())],
                paired=bool(item.get("paired", False)),
                covariate=[float(v) for v in item["covariate"]] if "covariate" in item else (),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"gate evidence for {metric!r} is malformed: {exc}") from None
    return evidence


def evidence_to_json(evidence: Mapping[str, Evidence]) -> dict[str, Any]:
    return {
        metric: {"candidate": list(e.candidate), "baseline": list(e.baseline), "paired": e.paired}
        | ({"covariate": list(e.covariate)} if len(e.covariate) else {})
        for metric, e in evidence.items()
    }


@dataclass(frozen=True)
class CheckResult:
    name: str
    metric: str
    kind: str
    passed: bool
    n: int
    estimate: float | None  # candidate - baseline (or the candidate's mean for "within").
    ci: tuple[float, float] | None
    reason: str
    # What the policy asked, kept with the verdict so that it reads on its own after the policy file changes.
    margin: float | None = None
    min_n: int = 0
    paired: bool | None = None  # How the evidence was compared (None: no evidence).
    p_value: float | None = None  # "associated": the permutation test's one-sided p-value.


@dataclass(frozen=True)
class Verdict:
    policy: str
    passed: bool
    checks: tuple[CheckResult, ...]
    decided_ms: int

    def to_json(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "passed": self.passed,
            "decided_ms": self.decided_ms,
            "checks": [asdict(c) for c in self.checks],
        }


def _check(check: GateCheck, evidence: Evidence | None, policy: GatePolicy, rng: np.random.Generator) -> CheckResult:
    def result(
        passed: bool,
        n: int,
        estimate: float | None,
        ci: tuple[float, float] | None,
        why: str,
        p_value: float | None = None,
    ) -> CheckResult:
        return CheckResult(
            name=check.name,
            metric=check.metric,
            kind=check.kind,
            passed=passed,
            n=n,
            estimate=estimate,
            ci=ci,
            reason=why,
            margin=check.margin,
            min_n=check.min_n,
            paired=None if evidence is None else evidence.paired,
            p_value=p_value,
        )

    if evidence is None or (evidence.missing and not evidence.candidate):
        why = f": {evidence.missing}" if evidence is not None else ""
        return result(False, 0, None, None, f"no evidence for {check.metric}{why}")
    if check.kind == "associated" and not evidence.paired:
        raise ValueError(f"{check.metric}: an association needs paired evidence (one outcome per signal item)")
    if evidence.paired and len(evidence.candidate) != len(evidence.baseline):
        raise ValueError(f"{check.metric}: paired evidence needs as many baseline items as candidate items")
    if check.paired is not None and evidence.paired != check.paired:
        asked, got = ("paired", "independent") if check.paired else ("independent", "paired")
        return result(False, 0, None, None, f"the policy asks for a {asked} test and the evidence is {got}")
    n = len(evidence.candidate) if check.kind == "within" else min(len(evidence.candidate), len(evidence.baseline))
    if n < check.min_n:
        return result(False, n, None, None, f"not enough evidence: {n} items, the policy needs {check.min_n}")
    if check.kind == "within":
        mean = float(np.mean(evidence.candidate))
        assert check.low is not None and check.high is not None
        inside = check.low <= mean <= check.high
        where = "in" if inside else "outside"
        why = f"mean {mean:.3g} {where} [{check.low}, {check.high}]"
        if check.max_outside is None:
            return result(inside, n, mean, None, why)
        items = np.asarray(evidence.candidate, dtype=float)
        outside = float(np.mean((items < check.low) | (items > check.high)))
        few_outside = outside <= check.max_outside
        why += f"; {outside:.1%} of items outside (at most {check.max_outside:.1%} allowed)"
        return result(inside and few_outside, n, mean, None, why)
    if check.kind == "associated":
        passed, rho, why, p = _association(check, evidence, policy, rng)
        return result(passed, n, rho, None, why, p)
    estimate, low, high = bootstrap_difference_ci(
        evidence.candidate,
        evidence.baseline,
        paired=evidence.paired,
        rng=rng,
        samples=policy.bootstrap_samples,
        level=policy.level,
    )
    # Express the interval as "gain": positive is better, whichever way the metric points.
    gain_low = low if check.direction == "higher" else -high
    if check.kind == "non_inferior":
        passed = gain_low > -check.margin
        where = "within the" if passed else "at or beyond the"  # A bound exactly at the margin fails.
        why = f"worst plausible loss {max(0.0, -gain_low):.3g} {where} margin {check.margin}"
    else:
        passed = gain_low > 0
        why = "better beyond doubt" if passed else "no clear gain (the interval includes 0 or a loss)"
    return result(passed, n, estimate, (low, high), why)


def _association(
    check: GateCheck, evidence: Evidence, policy: GatePolicy, rng: np.random.Generator
) -> tuple[bool, float | None, str, float | None]:
    """(passed, rank correlation, reason, p-value) of an ``associated`` check on evidence with enough items."""
    blocks, within = None, ""
    if check.blocks_of is not None:
        if len(evidence.covariate) != len(evidence.candidate):
            why = f"no covariate to block {check.metric} by (the policy asks for blocks of {check.blocks_of})"
            return False, None, why, None
        blocks = covariate_blocks(evidence.covariate, check.blocks_of, rng)
        within = f" within blocks of {check.blocks_of} of similar covariate"
    rho, p = association_test(
        evidence.candidate, evidence.baseline, rng=rng, resamples=policy.bootstrap_samples, blocks=blocks
    )
    alpha = (1.0 - policy.level) / 2.0
    passed = p <= alpha
    compared = "<=" if passed else ">"
    test = f"rank correlation {rho:+.3f}{within}, one-sided permutation p {p:.3g} {compared} {alpha:.3g}"
    why = f"the signal predicts the outcome ({test})" if passed else f"no sign the signal predicts the outcome ({test})"
    return passed, rho, why, p


def unreadable_evidence(policy: GatePolicy, why: str) -> Verdict:
    """The verdict on evidence the gate cannot read (malformed): every check fails, saying why."""
    checks = tuple(
        CheckResult(c.name, c.metric, c.kind, False, 0, None, None, f"unreadable evidence: {why}", c.margin, c.min_n)
        for c in policy.checks
    )
    return Verdict(policy.name, False, checks, int(time.time() * 1000))


def judge(policy: GatePolicy, evidence: Mapping[str, Evidence]) -> Verdict:
    """Apply every check of ``policy`` to ``evidence``; the verdict passes only when all of them pass."""
    # One generator per check, seeded by its name: a check's numbers do not depend on which checks come before it,
    # so a verdict judged again under a policy with a check added or removed keeps the others' intervals.
    results = tuple(
        _check(c, evidence.get(c.metric), policy, np.random.default_rng([policy.seed, zlib.crc32(c.name.encode())]))
        for c in policy.checks
    )
    return Verdict(policy.name, all(r.passed for r in results), results, int(time.time() * 1000))


VERDICT_HEADING = "## The evaluation gate's verdict"


def _number(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{float(value):+.{digits}f}"


def verdict_markdown(record: Mapping[str, Any]) -> str:
    """A stored verdict (``gates/<version>.json``: :meth:`Verdict.to_json` with version, pipeline and sessions) as
    the report section that says what the gate decided and on which numbers."""
    checks = [c for c in record.get("checks") or () if isinstance(c, Mapping)]
    outcome = "passed" if record.get("passed") else "failed"
    lines = [
        VERDICT_HEADING,
        "",
        f"Candidate {record.get('version', 'n/a')} {outcome} gate {record.get('policy', 'n/a')!r} (pipeline "
        f"{record.get('pipeline_id', 'n/a')}, {record.get('sessions', 'n/a')} sessions). A candidate that fails "
        "stays registered and is never served to a person.",
        "",
        "| check | metric | kind | n | estimate (candidate - baseline) | 95% CI | margin | min n | result |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in checks:
        ci = c.get("ci")
        interval = f"[{_number(ci[0])}, {_number(ci[1])}]" if isinstance(ci, Sequence) and len(ci) == 2 else "n/a"
        compares = c.get("kind") in ("non_inferior", "superior")
        margin = f"{float(c['margin']):g}" if compares and c.get("margin") is not None else "-"
        if compares:
            estimate = _number(c.get("estimate"))
        elif c.get("estimate") is None:
            estimate = "n/a"
        else:  # "within" estimates the candidate's mean, "associated" a rank correlation: not a difference.
            estimate = f"{float(c['estimate']):.3g} ({'mean' if c.get('kind') == 'within' else 'rho'})"
        result = "passed" if c.get("passed") else f"**failed**: {c.get('reason', '')}"
        lines.append(
            f"| {c.get('name')} | {c.get('metric')} | {c.get('kind')} | {c.get('n', 0)} | {estimate} "
            f"| {interval} | {margin} | {c.get('min_n', 0)} | {result} |"
        )
    return "\n".join(lines) + "\n"
