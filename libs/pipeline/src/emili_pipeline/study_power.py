"""How many sessions per arm the gate needs to see a candidate's gain (``emili study power``), with SIMULATED users.

The loop simulation study measures a candidate by the simulated users' hidden valence change; the gate cannot: like
with people, it sees Δv only through the gold labels, the labeler's valence of the pre- and post-chat surveys. The
surveys name the change coarsely ("a bit better", "about the same", ...), so a gain in hidden Δv shows up smaller
and noisier in gold Δv. This module measures by how much, and what that does to the gate's Δv checks:

1. each arm's per-session mean reply quality is taken from a finished study report (its feedback iterations' base
   and candidate users), so the arms differ as the loop's candidates really did;
2. many simulated users per arm hear replies of one such quality per session (the study's turns) and fill in both
   surveys; their hidden Δv is known, and their gold Δv is the valence the labeler gives the surveys' texts;
3. the gate policy's ``delta_v`` checks judge random draws of n sessions per arm, for several n: the share that pass
   is the gate's power at n (on gold Δv, and on hidden Δv for comparison); the same draws of base against a second
   simulated base arm give the rate at which a candidate no better than base would pass.

Replies within a session are given the session's mean quality, so the simulated hidden Δv is compared with the
study's observed one in the output: a large gap means the calibration does not describe that study.

Paired (``paired=True``), the same users meet every arm, as in the pipeline's arm sessions, and a user's random
streams are the same on each: the arms differ only in the replies' quality. That is the best case for pairing. In
the pipeline the models also differ in how many replies a user hears (unprompted ones) and each reply draws state
noise, so a user's two sessions drift further apart and the real paired power is somewhat lower.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from emili_affect.stats import bootstrap_ci
from emili_pipeline.gate import Evidence, GatePolicy, judge
from emili_pipeline.simulator import Persona, ReplyQuality, SimulatedUser
from emili_pipeline.simulator.run import user_seed
from emili_pipeline.simulator.state import ReplyScorer, StateModelSettings
from emili_pipeline.simulator.surveys import SurveyAnswers

ARMS = ("base", "candidate")
# Texts to valence: None where the text has no scorable word (the labeler then leaves that side missing).
ValenceScorer = Callable[[Sequence[str]], Sequence[float | None]]


def gold_text(answers: SurveyAnswers) -> str:
    """What the labeler scores of one survey with its default ``gold_text_source`` "both" (emili_labeler.gold): the
    ticked feelings in lower case, then the free text."""
    feelings = ", ".join(f.strip().lower() for f in answers.current_feelings if f.strip())
    return ". ".join(p for p in (feelings, answers.text.strip()) if p)


def report_qualities(report: Mapping[str, Any], condition: str = "feedback") -> dict[str, dict[str, list[float]]]:
    """Per arm, the per-session ``reply_quality`` and hidden ``delta_v`` of every iteration of ``condition`` in a
    study report (study.json); ValueError when it has none."""
    pooled: dict[str, dict[str, list[float]]] = {arm: {"reply_quality": [], "delta_v": []} for arm in ARMS}
    for record in (report.get("conditions") or {}).get(condition) or []:
        items = (record.get("evaluation") or {}).get("items") or {}
        for arm in ARMS:
            for metric in ("reply_quality", "delta_v"):
                pooled[arm][metric] += [float(v) for v in (items.get(arm) or {}).get(metric) or []]
    if not all(pooled[arm]["reply_quality"] for arm in ARMS):
        raise ValueError(
            f"the report has no per-session reply quality of both arms in condition {condition!r}: it needs a study "
            "that finished at least one iteration of it (emili study simulate)"
        )
    return pooled


@dataclass(frozen=True)
class SimulatedArm:
    hidden: list[float]  # Hidden valence change per user.
    pre_texts: list[str]
    post_texts: list[str]


def _constant(quality: ReplyQuality) -> ReplyScorer:
    def scorer(_reply: str, _message: str) -> ReplyQuality:
        return quality

    return scorer


def simulate_arm(
    qualities: Sequence[float],
    users: int,
    personas: Sequence[Persona],
    turns: int,
    seed: int,
    state_model: StateModelSettings | None = None,
    quality_seed: int | None = None,
) -> SimulatedArm:
    """``users`` simulated users, each hearing ``turns`` replies of one quality drawn from ``qualities`` (with
    ``quality_seed``, default ``seed``); users and personas as :func:`~emili_pipeline.simulator.run.run_users` picks
    them for ``seed``, so two arms with one ``seed`` meet the same users."""
    if not qualities or not personas or users < 1 or turns < 1:
        raise ValueError("need qualities, personas, at least one user and one turn")
    order = np.random.default_rng(seed).permutation(len(personas))
    draws = np.random.default_rng([seed, seed if quality_seed is None else quality_seed])
    hidden, pre, post = [], [], []
    for index in range(users):
        quality = ReplyQuality(float(qualities[int(draws.integers(len(qualities)))]))
        user = SimulatedUser(
            personas[int(order[index % len(personas)])],
            user_seed(seed, index),
            state_model=state_model,
            scorer=_constant(quality),
        )
        pre.append(gold_text(user.pre_survey()))
        for turn in range(turns):
            user.message(turn)
            user.hear("")
        post.append(gold_text(user.post_survey()))
        hidden.append(user.state.valence_change)
    return SimulatedArm(hidden, pre, post)


def gold_delta_v(arm: SimulatedArm, score: ValenceScorer) -> list[float | None]:
    """Each user's gold Δv (valence of the post-chat text minus that of the pre-chat one); None where a side has no
    scorable word. Each distinct text is scored once."""
    unique = sorted(set(arm.pre_texts) | set(arm.post_texts))
    valence = dict(zip(unique, score(unique), strict=True))
    out: list[float | None] = []
    for pre, post in zip(arm.pre_texts, arm.post_texts, strict=True):
        v_pre, v_post = valence[pre], valence[post]
        out.append(None if v_pre is None or v_post is None else v_post - v_pre)
    return out


def delta_v_policy(policy: GatePolicy) -> GatePolicy:
    """The policy's checks on ``delta_v`` alone (the ones this analysis can say anything about)."""
    checks = [c for c in policy.checks if c.metric == "delta_v"]
    if not checks:
        raise ValueError(f"gate {policy.name!r} has no check on delta_v")
    return policy.model_copy(update={"checks": checks})


def pass_rate(
    candidate: Sequence[float | None],
    baseline: Sequence[float | None],
    n: int,
    policy: GatePolicy,
    repeats: int,
    rng: np.random.Generator,
    paired: bool = False,
) -> float:
    """The share of ``repeats`` draws of ``n`` sessions per arm (without replacement) that pass every check. Paired:
    item i of both arms is the same user, drawn together (users missing an item on either arm are left out);
    otherwise each arm is drawn on its own (missing items left out)."""
    c = np.asarray([np.nan if v is None else v for v in candidate], dtype=np.float64)
    b = np.asarray([np.nan if v is None else v for v in baseline], dtype=np.float64)
    if paired:
        if len(c) != len(b):
            raise ValueError("paired arms need one item per user on each arm")
        both = np.isfinite(c) & np.isfinite(b)
        c, b = c[both], b[both]
    else:
        c, b = c[np.isfinite(c)], b[np.isfinite(b)]
    if n > min(len(c), len(b)):
        raise ValueError(f"{n} sessions per arm asked, the pools have {len(c)} and {len(b)}")
    passed = 0
    for _ in range(repeats):
        if paired:
            drawn = rng.choice(len(c), n, replace=False)
            evidence = {"delta_v": Evidence(c[drawn].tolist(), b[drawn].tolist(), paired=True)}
        else:
            evidence = {
                "delta_v": Evidence(
                    c[rng.choice(len(c), n, replace=False)].tolist(), b[rng.choice(len(b), n, replace=False)].tolist()
                )
            }
        passed += judge(policy, evidence).passed
    return passed / repeats


def _finite(value: float) -> float | None:
    """Rounded for the report; None (JSON null) where it could not be computed."""
    return round(value, 4) if math.isfinite(value) else None


def _summary(values: Sequence[float], seed: int) -> dict[str, Any]:
    low, high = bootstrap_ci(values, seed=seed)
    return {
        "n": len(values),
        "mean": round(float(np.mean(values)), 4),
        "sd": round(float(np.std(values, ddof=1)), 4) if len(values) > 1 else None,
        "ci95": [round(low, 4), round(high, 4)],
    }


def power_analysis(
    qualities: Mapping[str, Sequence[float]],
    score: ValenceScorer,
    policy: GatePolicy,
    personas: Sequence[Persona],
    *,
    sizes: Sequence[int],
    users: int,
    turns: int,
    repeats: int,
    seed: int = 0,
    state_model: StateModelSettings | None = None,
    observed_delta_v: Mapping[str, Sequence[float]] | None = None,
    paired: bool = False,
) -> dict[str, Any]:
    """The gate's pass rate at each n per arm, on gold and on hidden Δv, with the calibration behind it. Paired: the
    same users meet both arms (as the pipeline's arm sessions do) and the gate compares them user by user; the
    no-gain rate then compares base with base again, the same users hearing other replies of base's quality."""
    checks = delta_v_policy(policy)
    simulated = {
        name: simulate_arm(
            qualities[source], users, personas, turns, seed if paired else seed + i, state_model, quality_seed=seed + i
        )
        for i, (name, source) in enumerate((("base", "base"), ("candidate", "candidate"), ("base_again", "base")))
    }
    hidden_all = {name: arm.hidden for name, arm in simulated.items()}
    gold_all = {name: gold_delta_v(arm, score) for name, arm in simulated.items()}
    hidden = {arm: hidden_all[arm] for arm in ARMS}
    # Users with a side the labeler cannot score have no gold Δv, as in the gate's evidence.
    gold = {arm: [v for v in gold_all[arm] if v is not None] for arm in ARMS}
    if paired:  # The pool is the users scored on every arm.
        scored = sum(all(gold_all[name][i] is not None for name in gold_all) for i in range(users))
    else:
        scored = min(sum(v is not None for v in values) for values in gold_all.values())
    if scored < max(sizes):
        raise ValueError(
            f"only {scored} of {users} simulated users per arm have both surveys scored by the labeler"
            f"{' on every arm' if paired else ''}, fewer than the {max(sizes)} sessions per arm asked: raise users or "
            "lower sizes"
        )
    pairs = [(h, g) for arm in ARMS for h, g in zip(hidden[arm], gold_all[arm], strict=True) if g is not None]
    h_all, g_all = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
    slope = float(np.polyfit(h_all, g_all, 1)[0]) if len(pairs) > 2 and np.ptp(h_all) > 0 else float("nan")
    correlation = float(np.corrcoef(h_all, g_all)[0, 1]) if len(pairs) > 2 and np.std(g_all) > 0 else float("nan")
    rng = np.random.default_rng(seed)

    def rate(candidate: Sequence[float | None], baseline: Sequence[float | None], n: int) -> float:
        return pass_rate(candidate, baseline, n, checks, repeats, rng, paired)

    rows = []
    for n in sizes:
        rows.append(
            {
                "n_per_arm": n,
                "pass_gold": rate(gold_all["candidate"], gold_all["base"], n),
                "pass_hidden": rate(hidden["candidate"], hidden["base"], n),
                # Both arms base: how often a candidate no better than base would pass.
                "pass_gold_no_gain": rate(gold_all["base_again"], gold_all["base"], n),
            }
        )
    result: dict[str, Any] = {
        "synthetic": True,
        "policy": checks.name,
        "checks": [c.name for c in checks.checks],
        "users_per_arm": users,
        "paired": paired,
        "turns": turns,
        "repeats": repeats,
        "seed": seed,
        "qualities": {arm: _summary(qualities[arm], seed) for arm in ARMS},
        "hidden_delta_v": {arm: _summary(hidden[arm], seed) for arm in ARMS},
        "gold_delta_v": {arm: _summary(gold[arm], seed) for arm in ARMS},
        "unscored_users": {arm: len(gold_all[arm]) - len(gold[arm]) for arm in ARMS},
        "gold_on_hidden": {"slope": _finite(slope), "correlation": _finite(correlation), "n": len(pairs)},
        "rows": rows,
    }
    if observed_delta_v:
        result["observed_hidden_delta_v"] = {
            arm: _summary(observed_delta_v[arm], seed) for arm in ARMS if len(observed_delta_v.get(arm) or ()) > 1
        }
    return result


def _shown(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def render_markdown(result: Mapping[str, Any]) -> str:
    def arm_line(key: str, arm: str) -> str:
        s = result[key][arm]
        spread = "–" if s["sd"] is None else f"{s['sd']:.3f}"
        return f"{s['mean']:+.3f} (sd {spread}, n {s['n']})"

    lines = [
        "# Gate power for Δv (SYNTHETIC: simulated users)",
        "",
        "**SIMULATED users: how the gate's Δv checks behave on the simulator's users, not on people.**",
        "",
        f"Gate `{result['policy']}`, checks {', '.join(result['checks'])}; {result['users_per_arm']} simulated users "
        f"per arm, {result['turns']} replies each at a reply quality drawn from the study's sessions; "
        f"{result['repeats']} draws per row. "
        + (
            "Paired: the same users meet both arms and are compared user by user (as the pipeline's arm sessions)."
            if result.get("paired")
            else "Unpaired: other users on each arm."
        ),
        "",
        "| | base | candidate |",
        "|---|---|---|",
        f"| reply quality (the study's sessions) | {arm_line('qualities', 'base')} | "
        f"{arm_line('qualities', 'candidate')} |",
        f"| hidden Δv, simulated here | {arm_line('hidden_delta_v', 'base')} | "
        f"{arm_line('hidden_delta_v', 'candidate')} |",
    ]
    if result.get("observed_hidden_delta_v", {}).keys() == set(ARMS):
        lines.append(
            f"| hidden Δv, observed in the study | {arm_line('observed_hidden_delta_v', 'base')} | "
            f"{arm_line('observed_hidden_delta_v', 'candidate')} |"
        )
    fit = result["gold_on_hidden"]
    lines += [
        f"| gold Δv (the labeler on the surveys) | {arm_line('gold_delta_v', 'base')} | "
        f"{arm_line('gold_delta_v', 'candidate')} |",
        "",
        f"Gold Δv on hidden Δv: slope {_shown(fit['slope'])}, correlation {_shown(fit['correlation'])} (n {fit['n']}).",
        "",
        "| sessions per arm | gate passes (gold Δv) | gate passes (hidden Δv) | passes with no gain (gold Δv) |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['n_per_arm']} | {r['pass_gold']:.0%} | {r['pass_hidden']:.0%} | {r['pass_gold_no_gain']:.0%} |"
        for r in result["rows"]
    ]
    return "\n".join(lines) + "\n"


# --- the offline canary's power ------------------------------------------------------------------------------------


def report_ratings(report: Mapping[str, Any]) -> list[float]:
    """The per-session mean ratings of every base arm (the production arm of the study's canaries) in a study
    report, every condition and iteration; ValueError when it has none."""
    ratings = [
        float(r)
        for records in (report.get("conditions") or {}).values()
        for record in records
        for r in (((record.get("evaluation") or {}).get("items") or {}).get("base") or {}).get("rating") or ()
        if r is not None
    ]
    if len(ratings) < 2:
        raise ValueError("the report has fewer than 2 rated base sessions: run emili study simulate first")
    return ratings


def canary_power(
    ratings: Sequence[float], sizes: Sequence[int], shifts: Sequence[float], repeats: int = 200, seed: int = 0
) -> list[dict[str, Any]]:
    """How often the gateway's canary rule (:func:`emili_pipeline.study_sim.gateway_canary_decision`, planned at n)
    promotes a candidate whose ratings are the production's moved by ``shift`` rating points (clipped to 1-5): per
    n and shift, ``repeats`` draws of n rated sessions per arm, with replacement from ``ratings``. Judged on the
    rating and completion alone: the rule's harm checks on gold Δv and reactions can only roll back more, so these
    are upper bounds of the promote rate."""
    from emili_pipeline.study_sim import gateway_canary_decision

    pool = np.asarray(ratings, dtype=float)
    rng = np.random.default_rng(seed)
    rows = []
    for n in sizes:
        for shift in shifts:
            promoted = 0
            for _ in range(repeats):
                arms = [rng.choice(pool, n), np.clip(rng.choice(pool, n) + shift, 1.0, 5.0)]
                production, candidate = ([{"rating": float(r), "completed": 1.0} for r in arm] for arm in arms)
                promoted += gateway_canary_decision(candidate, production, planned_sessions=n)["outcome"] == "promoted"
            rows.append({"sessions_per_arm": n, "shift": shift, "repeats": repeats, "promoted": promoted / repeats})
    return rows


def render_canary_power(rows: Sequence[Mapping[str, Any]], ratings: int, report: str) -> str:
    shifts = sorted({r["shift"] for r in rows})
    sizes = sorted({r["sessions_per_arm"] for r in rows})
    rate = {(r["sessions_per_arm"], r["shift"]): r["promoted"] for r in rows}
    return "\n".join(
        [
            "# The offline canary's power (SYNTHETIC: simulated users)",
            "",
            f"Share of draws the gateway's canary rule promotes, planned at n rated sessions per arm: both arms drawn "
            f"from the {ratings} rated base sessions of {report}, the candidate's ratings moved by the shift. Rating "
            "and completion only (the harm checks on gold Δv and reactions can only roll back more): upper bounds.",
            "",
            "| sessions per arm | " + " | ".join(f"shift {s:+.2f}" for s in shifts) + " |",
            "|---|" + "---|" * len(shifts),
            *(f"| {n} | " + " | ".join(f"{rate[(n, s)]:.2f}" for s in shifts) + " |" for n in sizes),
            "",
        ]
    )
