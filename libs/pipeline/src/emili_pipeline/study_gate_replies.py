"""What the gate's simulated users heard: the hidden quality of the replies in a pipeline's own evaluation sessions
(SYNTHETIC).

The gate judges a candidate by what the labeler reads from simulated users' faces and surveys. Of those same sessions
the simulator knows what no instrument can: each reply's hidden quality (:func:`reply_quality`), how much of it is
the length term, and whether the reply was cut off at the chat service's token limit. Per simulated user (the same
user meets both arms): candidate - production, users resampled. It says whether a gate's verdict followed a real
change in the replies, and which one: in run O (BENCHMARKS.md) both noise candidates cut off far fewer replies than
base, a gain on the length term that needs no feedback.

Per reply (one that answers a user message): ``quality`` (-1..1), ``length_penalty`` (the length component, 0..1, 1
for a reply more than 4.5 times as long as the user's message or 8 words, whichever is longer), ``cut_off`` (1 when
cut off at the token limit) and ``words``; each session contributes the mean over its replies. A session that cannot
be read (missing, or a malformed record) is left out and counted in ``unreadable``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from emili_pipeline.simulator.state import ReplyScorer, reply_quality, word_count

METRICS = ("quality", "length_penalty", "cut_off", "words")


def reply_values(events: Iterable[Mapping[str, Any]], scorer: ReplyScorer = reply_quality) -> list[dict[str, float]]:
    """The :data:`METRICS` of each of a session's replies that answer a user message, scored against that message."""
    from emili_session.conversation import conversation, system_prompt_of

    events = list(events)
    rows: list[dict[str, float]] = []
    last_user: str | None = None
    for turn in conversation(system_prompt_of(events), events):
        if turn.role == "user":
            last_user = turn.content
        elif turn.role == "assistant" and not turn.unprompted and last_user is not None:
            scored = scorer(turn.content, last_user)
            rows.append(
                {
                    "quality": scored.score,
                    "length_penalty": scored.components.get("length", 0.0),
                    "cut_off": 1.0 if turn.at_limit else 0.0,
                    "words": float(word_count(turn.content)),
                }
            )
            last_user = None
    return rows


def session_means(rows: Sequence[Mapping[str, float]]) -> dict[str, float] | None:
    """The mean of each metric over a session's replies (None without a reply)."""
    if not rows:
        return None
    return {m: float(np.mean([r[m] for r in rows])) for m in METRICS}


def compare(
    candidate: Mapping[str, Mapping[str, float]], production: Mapping[str, Mapping[str, float]], seed: int = 0
) -> dict[str, Any]:
    """Per metric: each arm's mean over its sessions and candidate - production per user who met both arms, with a
    95% bootstrap interval resampling users. Both arguments map a user to their session's means (the pipeline's
    simulated users give one session per arm)."""
    from emili_pipeline.study_sim import paired_interval

    both = [u for u in candidate if u in production]
    out: dict[str, Any] = {"sessions": {"candidate": len(candidate), "production": len(production)}}
    for metric in METRICS:
        out[metric] = {
            "candidate": round(float(np.mean([s[metric] for s in candidate.values()])), 4) if candidate else None,
            "production": round(float(np.mean([s[metric] for s in production.values()])), 4) if production else None,
            "paired": paired_interval([candidate[u][metric] - production[u][metric] for u in both], seed),
        }
    return out


def gate_replies(
    store: Any, pipeline_id: str, candidate: str, production: str = "base", seed: int = 0
) -> dict[str, Any]:
    """:func:`compare` over the pipeline's simulated users of the candidate's and the production's arm (its
    ``arm_sessions`` step's sessions); {} when the step did not run either version."""
    from emili_core.errors import NotFound
    from emili_core.keys import pipeline_arm_sessions_key
    from emili_core.objectstore import Bucket
    from emili_core.records import load_session

    recorded = store.get_json(Bucket.MODELS, pipeline_arm_sessions_key(pipeline_id))
    arm_of = {version: arm for arm, version in (recorded.get("versions") or {}).items()}
    if candidate not in arm_of or production not in arm_of:
        return {}
    unreadable = 0

    def per_user(version: str) -> dict[str, dict[str, float]]:
        nonlocal unreadable
        users: dict[str, dict[str, float]] = {}
        for session_id in (recorded.get("arms") or {}).get(arm_of[version]) or ():
            try:
                manifest, events = load_session(store, session_id)
                means = session_means(reply_values(events))
            except (NotFound, ValueError):  # One lost or malformed record is not a reason to lose the rest.
                unreadable += 1
                continue
            if means is not None:
                users[str(manifest.get("user_id") or session_id)] = means
        return users

    candidate_users, production_users = per_user(candidate), per_user(production)  # Both before reading unreadable.
    return {"candidate_version": candidate, "production_version": production, "unreadable": unreadable} | compare(
        candidate_users, production_users, seed
    )


def _cell(values: Mapping[str, Any], digits: int) -> str:
    paired = values["paired"]
    if paired.get("difference") is None:
        return "–"
    arms = f"{values['production']:.{digits}f} / {values['candidate']:.{digits}f}"
    ci = paired.get("ci95") or (None, None)
    interval = "–" if None in ci else f"[{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]"
    return f"{arms} ({paired['difference']:+.{digits}f} {interval})"


def gate_replies_table(conditions: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[str]:
    """The report's table: one row per iteration that recorded its gate sessions' replies (none: no table)."""
    rows = [
        f"| {condition} | {it['iteration']} | {heard['candidate_version']} | {heard['production_version']} | "
        f"{heard['sessions']['production']} / {heard['sessions']['candidate']}"
        f"{f' ({n} unreadable)' if (n := heard.get('unreadable')) else ''} | {_cell(heard['quality'], 3)} | "
        f"{_cell(heard['length_penalty'], 3)} | {_cell(heard['cut_off'], 2)} | {_cell(heard['words'], 1)} |"
        for condition, iterations in conditions.items()
        for it in iterations
        if (heard := it.get("gate_replies"))
    ]
    if not rows:
        return []
    return [
        "### What the gate's users heard: hidden quality of the replies it judged (SYNTHETIC: simulated users)",
        "",
        "The replies of the pipeline's own evaluation sessions (the gate's evidence), scored by the simulator's known "
        "reply-quality function against the user message they answer; each session counts the mean over its "
        "replies. Production / candidate, then (candidate - production per simulated user who met both arms, 95% "
        "bootstrap interval over users). Length penalty: the length component (0-1) of the quality, which a "
        "candidate lowers by stopping sooner whatever the feedback said; cut off: the share of replies that "
        "stopped at the token limit.",
        "",
        "| condition | iteration | candidate | production | sessions, production / candidate | hidden quality | "
        "length penalty | cut off at the limit | words |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
    ]
