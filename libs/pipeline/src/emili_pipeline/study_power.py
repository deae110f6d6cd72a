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
   is the gate's power at n (on gold Δv, and on hidden Δv for comparison); the same draws with both arms from the
   base pool give the rate at which a candidate no better than base would pass.

Replies within a session are given the session's mean quality, so the simulated hidden Δv is compared with the
study's observed one in the output: a large gap means the calibration does not describe that study.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from emili_affect.stats import bootstrap_ci
from emili_pipeline.gate import Evidence, GatePolicy, judge
from emili_pipeline.simulator import Persona, ReplyQuality, SimulatedUser
from emili_pipeline.simulator.run import user_seed
from emili_pipeline.simulator.state import StateModelSettings
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


def simulate_arm(
    qualities: Sequence[float],
    users: int,
    personas: Sequence[Persona],
    turns: int,
    seed: int,
    state_model: StateModelSettings | None = None,
) -> SimulatedArm:
    """``users`` simulated users, each hearing ``turns`` replies of one quality drawn from ``qualities``; users and
    personas as :func:`~emili_pipeline.simulator.run.run_users` picks them for ``seed``."""
    if not qualities or not personas or users < 1 or turns < 1:
        raise ValueError("need qualities, personas, at least one user and one turn")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(personas))
    hidden, pre, post = [], [], []
    for index in range(users):
        quality = ReplyQuality(float(qualities[int(rng.integers(len(qualities)))]))
        user = SimulatedUser(
            personas[int(order[index % len(personas)])],
            user_seed(seed, index),
            state_model=state_model,
            scorer=lambda _reply, _message, q=quality: q,
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
    candidate: Sequence[float],
    baseline: Sequence[float],
    n: int,
    policy: GatePolicy,
    repeats: int,
    rng: np.random.Generator,
) -> float:
    """The share of ``repeats`` draws of ``n`` sessions per arm (without replacement) that pass every check."""
    c, b = np.asarray(candidate, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if n > min(len(c), len(b)):
        raise ValueError(f"{n} sessions per arm asked, the pools have {len(c)} and {len(b)}")
    passed = 0
    for _ in range(repeats):
        evidence = {
            "delta_v": Evidence(
                candidate=c[rng.choice(len(c), n, replace=False)].tolist(),
                baseline=b[rng.choice(len(b), n, replace=False)].tolist(),
            )
        }
        passed += judge(policy, evidence).passed
    return passed / repeats


def _summary(values: Sequence[float], seed: int) -> dict[str, Any]:
    low, high = bootstrap_ci(values, seed=seed)
    return {
        "n": len(values),
        "mean": round(float(np.mean(values)), 4),
        "sd": round(float(np.std(values, ddof=1)), 4),
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
) -> dict[str, Any]:
    """The gate's pass rate at each n per arm, on gold and on hidden Δv, with the calibration behind it."""
    checks = delta_v_policy(policy)
    arms = {
        arm: simulate_arm(qualities[arm], users, personas, turns, seed + i, state_model) for i, arm in enumerate(ARMS)
    }
    hidden = {arm: arms[arm].hidden for arm in ARMS}
    gold_all = {arm: gold_delta_v(arms[arm], score) for arm in ARMS}
    # Users with a side the labeler cannot score have no gold Δv, as in the gate's evidence.
    gold = {arm: [v for v in gold_all[arm] if v is not None] for arm in ARMS}
    scored = min(len(gold[arm]) for arm in ARMS)
    if scored < max(sizes):
        raise ValueError(
            f"only {scored} of {users} simulated users per arm have both surveys scored by the labeler, fewer than "
            f"the {max(sizes)} sessions per arm asked: raise users or lower sizes"
        )
    pairs = [(h, g) for arm in ARMS for h, g in zip(hidden[arm], gold_all[arm], strict=True) if g is not None]
    h_all, g_all = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
    slope = float(np.polyfit(h_all, g_all, 1)[0]) if len(pairs) > 2 and np.ptp(h_all) > 0 else float("nan")
    correlation = float(np.corrcoef(h_all, g_all)[0, 1]) if len(pairs) > 2 and np.std(g_all) > 0 else float("nan")
    rng = np.random.default_rng(seed)
    rows = []
    for n in sizes:
        rows.append(
            {
                "n_per_arm": n,
                "pass_gold": pass_rate(gold["candidate"], gold["base"], n, checks, repeats, rng),
                "pass_hidden": pass_rate(hidden["candidate"], hidden["base"], n, checks, repeats, rng),
                # Both arms from base: how often a candidate no better than base would pass.
                "pass_gold_no_gain": pass_rate(gold["base"], gold["base"], n, checks, repeats, rng),
            }
        )
    result: dict[str, Any] = {
        "synthetic": True,
        "policy": checks.name,
        "checks": [c.name for c in checks.checks],
        "users_per_arm": users,
        "turns": turns,
        "repeats": repeats,
        "seed": seed,
        "qualities": {arm: _summary(qualities[arm], seed) for arm in ARMS},
        "hidden_delta_v": {arm: _summary(hidden[arm], seed) for arm in ARMS},
        "gold_delta_v": {arm: _summary(gold[arm], seed) for arm in ARMS},
        "unscored_users": {arm: len(gold_all[arm]) - len(gold[arm]) for arm in ARMS},
        "gold_on_hidden": {"slope": round(slope, 4), "correlation": round(correlation, 4), "n": len(pairs)},
        "rows": rows,
    }
    if observed_delta_v:
        result["observed_hidden_delta_v"] = {
            arm: _summary(observed_delta_v[arm], seed) for arm in ARMS if len(observed_delta_v.get(arm) or ()) > 1
        }
    return result


def render_markdown(result: Mapping[str, Any]) -> str:
    def arm_line(key: str, arm: str) -> str:
        s = result[key][arm]
        return f"{s['mean']:+.3f} (sd {s['sd']:.3f}, n {s['n']})"

    lines = [
        "# Gate power for Δv (SYNTHETIC: simulated users)",
        "",
        "**SIMULATED users: how the gate's Δv checks behave on the simulator's users, not on people.**",
        "",
        f"Gate `{result['policy']}`, checks {', '.join(result['checks'])}; {result['users_per_arm']} simulated users "
        f"per arm, {result['turns']} replies each at a reply quality drawn from the study's sessions; "
        f"{result['repeats']} draws per row.",
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
        f"Gold Δv on hidden Δv: slope {fit['slope']:.3f}, correlation {fit['correlation']:.3f} (n {fit['n']}).",
        "",
        "| sessions per arm | gate passes (gold Δv) | gate passes (hidden Δv) | passes with no gain (gold Δv) |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['n_per_arm']} | {r['pass_gold']:.0%} | {r['pass_hidden']:.0%} | {r['pass_gold_no_gain']:.0%} |"
        for r in result["rows"]
    ]
    return "\n".join(lines) + "\n"
