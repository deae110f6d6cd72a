"""Fine-tuning data from recorded chat sessions: SFT examples, feedback preference pairs, manifests.

Everything here is a pure function of its inputs (only :func:`write_jsonl` touches the disk), and every
output is deterministic: ids are sha256 digests of canonical JSON, records come out in a stable order.

What the functions decide, so the data can be interpreted:

* **Conversation.** What the model saw, as :func:`emili_session.conversation.conversation` rebuilds it (the
  chat service builds its context with the same function): the system prompt, then readouts and reminders
  as ``system`` messages where they occurred, user and assistant messages (the latter carrying ``turn_id``).
* **SFT** (:func:`sft_examples`): ONE record per session, the whole conversation, with ``weight`` 1 on
  assistant messages whose turn is flagged True and 0 on every other assistant message; user and system
  messages carry no weight (never trained on). One record per session keeps the file free of N copies of
  the same prefix; the trainer turns it into one training example per weight-1 reply (the system prompt,
  as much recent context as its ``max_length`` allows, that reply), so late replies are never cut off.
  EmpatheticDialogues SFT records (:func:`emili_labeler.empathetic.empathetic_sft_examples`) have the same
  form, with ``"source": "empathetic"`` and a ``conv_id`` in place of the session. Sessions without a
  weight-1 turn produce nothing. Empty replies, and replies cut off at the chat service's token limit
  (``at_limit``: they stop mid-thought, and training on them would teach the model to stop there too), are never
  weighted 1 as they are; under ``cut_replies="trimmed"`` a cut reply is trained cut back to its last complete
  sentence (:func:`trim_to_sentence`), under ``"open_end"`` as recorded with ``"open_end": True`` (the trainer then
  puts no loss on the end-of-turn marker after it, so it teaches no stop). ``delta_share`` below 1
  (:func:`sft_delta_cutoff`) weights only that share of all the flagged replies, those with the largest reactions
  across every session (a flag without a measured delta never passes such a cut). With ``include_readouts=False``
  readouts and reminders (which refer to the readout) are dropped, and unprompted replies get weight 0: what
  triggered them was a readout.
* **Feedback pairs** (:func:`feedback_pairs`): only replies that answer a user message are paired (the prompt must end
  with the user message; unprompted remarks answer a face, not a context). The context key is the system prompt plus
  the user/assistant messages up to and including that user message, whitespace-normalised (NFC, runs of whitespace
  collapsed, case kept); readouts and reminders are left out of the key so the same words under different faces count
  as the same context. Within a context, each reply flagged True is paired with each reply flagged False with a
  measured delta (unflaggable turns, ``flagged`` None or False without a delta, are skipped, as are pairs whose
  replies read the same; a reply cut off at the token limit is never the chosen side, and may be the rejected one, or
  under ``cut_replies="trimmed"`` or ``"open_end"`` is cut back to its last complete sentence and may be either); at
  most ``max_pairs_per_context`` pairs per context. With ``selection="margin"`` (the default) they are the pairs whose
  reactions differ most (chosen delta minus rejected delta), ties broken by a generator seeded by ``(seed, context)``;
  with ``"random"`` they are drawn with that generator alone. ``margin_share`` below 1 first keeps only that share of
  all combinations, those with the widest margins across every context. Without it one context's pairs do not depend
  on any other's. Why margin: a reaction is a noisy reading of a face, and in the loop simulation study's sessions
  only pairs with a wide margin were ordered as the users' hidden preference orders them (BENCHMARKS.md, "Which
  feedback pairs carry the preference"). The prompt is the chosen side's context without readouts (the two replies saw
  different faces, so neither face is the shared context); ``include_readouts=True`` keeps the chosen side's readouts.
  ``chosen`` / ``rejected`` are plain reply texts with no role tag (see :func:`plain_reply`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import tempfile
import unicodedata
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from emili_session.conversation import INJECTED_KINDS, Turn, conversation

__all__ = [
    "CUT_REPLY_RULES",
    "DATASET_KINDS",
    "DEFAULT_CUT_REPLIES",
    "DEFAULT_PAIR_SELECTION",
    "PAIR_SELECTIONS",
    "CutReplies",
    "DatasetKind",
    "DatasetManifest",
    "PairSelection",
    "SessionInput",
    "TurnLabel",
    "TurnLabelLike",
    "canonical_json",
    "check_cut_replies",
    "check_pair_options",
    "check_share",
    "content_id",
    "context_key",
    "feedback_pairs",
    "jsonl_bytes",
    "normalise_text",
    "plain_reply",
    "sft_delta_cutoff",
    "sft_examples",
    "trim_to_sentence",
    "write_jsonl",
]

DatasetKind = Literal["sft", "dpo_feedback", "dpo_empathetic"]
DATASET_KINDS: tuple[DatasetKind, ...] = ("sft", "dpo_feedback", "dpo_empathetic")

# What becomes of a reply cut off at the token limit. rejected_only: never trained on by SFT, never a chosen side,
# may be a rejected side. trimmed: cut back to its last complete sentence and then used as any other reply, on
# either side (left out when no sentence ends in it). Why trimmed exists: rejected_only favours complete replies
# whatever the reactions say, a preference for shorter replies that needs no feedback at all (BENCHMARKS.md, run M).
# open_end: SFT trains it as the model said it, marked ``"open_end": True`` so that the trainer puts no loss on the
# end-of-turn marker after it; pairs use it trimmed, as under trimmed. Why open_end exists: under trimmed every SFT
# target ends a reply, so self-training on random replies still teaches the model to stop sooner than it does (both
# noise candidates of run O cut off far fewer replies than base); trained as generated, replies chosen at random
# leave the model's stopping as it was, and only the reactions can shorten it (BENCHMARKS.md, run O).
CutReplies = Literal["rejected_only", "trimmed", "open_end"]
CUT_REPLY_RULES: tuple[CutReplies, ...] = ("rejected_only", "trimmed", "open_end")
DEFAULT_CUT_REPLIES: CutReplies = "rejected_only"
# The end of a sentence: . ! ? or an ellipsis, then any closing quotes or brackets.
_SENTENCE_END = re.compile(r"(?:[.!?]|\u2026)+[\"'\u201d\u2019)\]]*")


class TurnLabelLike(Protocol):
    """What a turn label must offer; the labeller's own label type fits without conversion."""

    @property
    def flagged(self) -> bool | None: ...

    @property
    def delta(self) -> float | None: ...


@dataclass(frozen=True, slots=True)
class TurnLabel:
    """A turn's flag: True (positive reaction), False (negative), None (unflaggable, no face data)."""

    flagged: bool | None
    delta: float | None = None


@dataclass(frozen=True)
class SessionInput:
    """One recorded session with what is needed to pair its replies."""

    session_id: str
    system_prompt: str
    events: Sequence[Mapping[str, Any]]
    labels: Mapping[str, TurnLabelLike]


# --- canonical JSON, ids, files ------------------------------------------------------------------------


def canonical_json(obj: Any) -> str:
    # Sorted keys and no whitespace so equal content always gives equal bytes; NaN is refused, not written
    # as the non-standard token.
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def content_id(obj: Any) -> str:
    """sha256 (hex) of ``obj``'s canonical JSON (UTF-8)."""
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()


def jsonl_bytes(records: Iterable[Mapping[str, Any]]) -> bytes:
    """The JSONL bytes :func:`write_jsonl` writes: one canonical JSON object per line, LF-terminated."""
    return "".join(canonical_json(record) + "\n" for record in records).encode("utf-8")


def write_jsonl(records: Iterable[Mapping[str, Any]], path: str | os.PathLike[str]) -> str:
    """Write ``records`` as JSONL to ``path`` atomically; return the sha256 (hex) of the bytes written."""
    data = jsonl_bytes(records)
    target = Path(path)
    # Write beside the target and rename, so a reader never sees a half-written dataset.
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return hashlib.sha256(data).hexdigest()


# --- text -----------------------------------------------------------------------------------------------

_WHITESPACE = re.compile(r"\s+")
# Chat-template role markers a reply must not carry: the trainer's template adds the assistant tag itself,
# and a second one (EmPO's bug) teaches the model to emit it.
_LEADING_ROLE_TAG = re.compile(
    r"^\s*(?:<\|im_start\|>\s*assistant\b|<\|assistant\|>|<\|start_header_id\|>\s*assistant\s*<\|end_header_id\|>"
    r"|<start_of_turn>\s*model\b|\[/INST\]|(?:assistant|emili)\s*:)\s*",
    re.IGNORECASE,
)
_TRAILING_END_TAG = re.compile(r"\s*(?:<\|im_end\|>|<\|eot_id\|>|<\|end\|>|<end_of_turn>|</s>)\s*$", re.IGNORECASE)


def normalise_text(text: str) -> str:
    """NFC, runs of whitespace collapsed to one space, stripped. Case is kept."""
    return _WHITESPACE.sub(" ", unicodedata.normalize("NFC", text)).strip()


def plain_reply(text: str) -> str:
    """A reply without leading role tags or trailing end-of-turn tokens, stripped."""
    previous = None
    while previous != text:  # Tags can be stacked ("<|assistant|>\nAssistant: ...").
        previous = text
        text = _TRAILING_END_TAG.sub("", _LEADING_ROLE_TAG.sub("", text))
    return text.strip()


def check_cut_replies(cut_replies: str) -> None:
    """ValueError naming the rule when it is not one of :data:`CUT_REPLY_RULES`."""
    if cut_replies not in CUT_REPLY_RULES:
        raise ValueError(f"unknown cut_replies rule {cut_replies!r}: one of {', '.join(CUT_REPLY_RULES)}")


def trim_to_sentence(text: str) -> str:
    """``text`` up to and including its last complete sentence, stripped; "" when no sentence ends in it."""
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    return text[: ends[-1]].strip() if ends else ""


def _trimmed(entry: Turn, cut_replies: CutReplies) -> bool:
    """Whether a pair uses this reply cut back to its last complete sentence (SFT too, under ``trimmed``)."""
    return cut_replies in ("trimmed", "open_end") and entry.at_limit is True


def _open_end(entry: Turn, cut_replies: CutReplies) -> bool:
    """Whether SFT trains this reply as generated, with no loss on the end-of-turn marker after it."""
    return cut_replies == "open_end" and entry.at_limit is True


def _trainable_text(entry: Turn, cut_replies: CutReplies) -> str:
    """The reply as SFT may train on it: as recorded (open-ended under ``open_end``), trimmed (a cut reply under
    ``trimmed``), or "" (not usable)."""
    if _open_end(entry, cut_replies):
        return entry.content
    if _trimmed(entry, cut_replies):
        return trim_to_sentence(plain_reply(entry.content))
    return "" if entry.at_limit is True else entry.content


def _finite(value: float | None) -> float | None:
    # A NaN or infinite delta is as good as no delta, and would not survive canonical JSON.
    return float(value) if value is not None and math.isfinite(value) else None


# --- SFT ------------------------------------------------------------------------------------------------


def _flagged_delta(
    entry: Turn, label: TurnLabelLike | None, include_readouts: bool, cut_replies: CutReplies
) -> float | None:
    """A trainable flagged reply's reaction (-inf when its flag came without a measured delta); None otherwise."""
    trainable = bool(_trainable_text(entry, cut_replies).strip()) and (include_readouts or not entry.unprompted)
    if not trainable or label is None or label.flagged is not True:
        return None
    delta = _finite(label.delta)
    return -math.inf if delta is None else delta


def check_share(name: str, share: float) -> None:
    """ValueError naming the option when a share of replies or pairs to keep is not in (0, 1]."""
    if not 0.0 < share <= 1.0:
        raise ValueError(f"{name} must be above 0 and at most 1, got {share}")


def sft_delta_cutoff(
    sessions: Sequence[SessionInput],
    delta_share: float,
    include_readouts: bool = True,
    cut_replies: CutReplies = DEFAULT_CUT_REPLIES,
) -> float:
    """The smallest reaction among the ``delta_share`` of all flagged replies (every session together) with the
    largest ones; -inf (keep every flagged reply) at a share of 1. Why: a flag is a noisy reading of a face, and a
    reply flagged on a barely positive change is little evidence that the user liked it (the same reason
    ``margin_share`` exists for pairs)."""
    check_share("delta_share", delta_share)
    deltas = [
        delta
        for session in sessions
        for entry in conversation(session.system_prompt, session.events)
        if entry.role == "assistant" and entry.turn_id is not None
        if (delta := _flagged_delta(entry, session.labels.get(entry.turn_id), include_readouts, cut_replies))
        is not None
    ]
    return _top_share_cutoff(deltas, delta_share)


def sft_examples(
    session_id: str,
    system_prompt: str,
    events: Sequence[Mapping[str, Any]],
    labels: Mapping[str, TurnLabelLike],
    include_readouts: bool = True,
    min_delta: float = -math.inf,
    cut_replies: CutReplies = DEFAULT_CUT_REPLIES,
) -> list[dict[str, Any]]:
    """Zero or one chat-JSONL example for the session (see the module docstring for the rules).

    The example is ``{"id", "session_id", "messages", "flagged_turns"}``; ``messages`` are
    ``{"role", "content"}`` plus ``"weight"`` (0 or 1) on assistant messages only. With ``min_delta`` (from
    :func:`sft_delta_cutoff`) a flagged reply is weighted only when its reaction reached it. Under ``cut_replies``
    "trimmed" a weighted cut reply is trained as trimmed; under "open_end" as the model said it, with
    ``"open_end": True``; an unweighted one stays as the model said it (context).
    """
    messages: list[dict[str, Any]] = []
    flagged_turns: list[str] = []
    for entry in conversation(system_prompt, events):
        if entry.kind in INJECTED_KINDS and not include_readouts:
            continue
        message: dict[str, Any] = {"role": entry.role, "content": entry.content}
        if entry.role == "assistant":
            assert entry.turn_id is not None  # conversation() guarantees it.
            delta = _flagged_delta(entry, labels.get(entry.turn_id), include_readouts, cut_replies)
            weight = 1 if delta is not None and delta >= min_delta else 0
            message["weight"] = weight
            if weight:
                message["content"] = _trainable_text(entry, cut_replies)
                if _open_end(entry, cut_replies):
                    message["open_end"] = True
                flagged_turns.append(entry.turn_id)
        messages.append(message)
    if not flagged_turns:
        return []
    body = {"session_id": session_id, "messages": messages}
    return [{"id": content_id(body), **body, "flagged_turns": flagged_turns}]


# --- DPO from feedback ----------------------------------------------------------------------------------


def context_key(messages: Sequence[Mapping[str, Any]]) -> str:
    """The id of a context: the sha256 of its (role, normalised content) sequence.

    Expects ``messages`` as :func:`emili_session.conversation.conversation_messages` makes them minus readouts
    and reminders, i.e. an optional leading system prompt followed by user/assistant messages.
    """
    return content_id([[m["role"], normalise_text(str(m["content"]))] for m in messages])


@dataclass(frozen=True, slots=True)
class _Reply:
    session_id: str
    turn_id: str
    text: str  # plain_reply of the recorded text.
    flagged: bool
    delta: float | None
    prompt: tuple[Mapping[str, str], ...]  # Without readouts; ends with the user message.
    prompt_with_readouts: tuple[Mapping[str, str], ...]
    at_limit: bool  # Cut off at the token limit (and not trimmed): never a chosen side.


def _reaction(label: TurnLabelLike | None) -> bool | None:
    """True (positive), False (negative) or None (no usable reaction) for pairing."""
    if label is None or label.flagged is None:
        return None
    # "Not flagged" without a measured delta is how the reaction labeller marks a turn it could not read
    # (no face in a window): that is no evidence of a negative reaction.
    if label.flagged is False and _finite(label.delta) is None:
        return None
    return label.flagged


def _replies(session: SessionInput, cut_replies: CutReplies) -> list[tuple[str, _Reply]]:
    """(context key, reply) for each of the session's pairable replies."""
    out: list[tuple[str, _Reply]] = []
    plain: list[dict[str, str]] = []  # The conversation so far without readouts/reminders.
    full: list[dict[str, str]] = []
    for entry in conversation(session.system_prompt, session.events):
        message = {"role": entry.role, "content": entry.content}
        if entry.role == "assistant":
            assert entry.turn_id is not None
            label = session.labels.get(entry.turn_id)
            trimmed = _trimmed(entry, cut_replies)
            text = trim_to_sentence(plain_reply(entry.content)) if trimmed else plain_reply(entry.content)
            answers_user = bool(plain) and plain[-1]["role"] == "user"
            reaction = _reaction(label)
            if answers_user and not entry.unprompted and text and reaction is not None:
                reply = _Reply(
                    session.session_id,
                    entry.turn_id,
                    text,
                    reaction,
                    _finite(label.delta) if label is not None else None,
                    tuple(dict(m) for m in plain),
                    tuple(dict(m) for m in full),
                    entry.at_limit is True and not trimmed,
                )
                out.append((context_key(plain), reply))
        full.append(message)
        if entry.kind not in INJECTED_KINDS:
            plain.append(message)
    return out


def _group_rng(seed: int, key: str) -> random.Random:
    # Seeded from (seed, context) so adding sessions to one context never changes another context's draw.
    return random.Random(int(content_id([seed, key]), 16))


# At most this many feedback pairs per context by default, so that no one opening line dominates the data.
DEFAULT_PAIRS_PER_CONTEXT = 4
# Which of a context's positive x negative combinations become pairs when there are more than the cap.
PairSelection = Literal["margin", "random"]
PAIR_SELECTIONS: tuple[PairSelection, ...] = ("margin", "random")
DEFAULT_PAIR_SELECTION: PairSelection = "margin"


def check_pair_options(max_pairs_per_context: int, selection: str, margin_share: float) -> None:
    """ValueError naming the option when a feedback-pair option is out of range."""
    if max_pairs_per_context < 1:
        raise ValueError(f"max_pairs_per_context must be at least 1, got {max_pairs_per_context}")
    if selection not in PAIR_SELECTIONS:
        raise ValueError(f"unknown pair selection {selection!r}: one of {', '.join(PAIR_SELECTIONS)}")
    check_share("margin_share", margin_share)


def _top_share_cutoff(values: Sequence[float], share: float) -> float:
    """The smallest value among the largest ``share`` of ``values`` (-inf keeps everything; -inf values are
    unmeasured margins or reactions)."""
    if share >= 1.0 or not values:
        return -math.inf
    ranked = sorted(values, reverse=True)
    cutoff = ranked[max(1, math.ceil(share * len(ranked))) - 1]
    # A cut among unmeasured values would keep them all: only measured ones can pass a cut.
    return cutoff if math.isfinite(cutoff) else math.nextafter(-math.inf, 0.0)


def _margin(chosen: _Reply, rejected: _Reply) -> float:
    # A side without a measured delta (a flag set without one) gives no evidence of how wide the gap is.
    if chosen.delta is None or rejected.delta is None:
        return -math.inf
    return chosen.delta - rejected.delta


def feedback_pairs(
    sessions: Sequence[SessionInput],
    *,
    max_pairs_per_context: int = DEFAULT_PAIRS_PER_CONTEXT,
    seed: int = 0,
    include_readouts: bool = False,
    selection: PairSelection = DEFAULT_PAIR_SELECTION,
    margin_share: float = 1.0,
    cut_replies: CutReplies = DEFAULT_CUT_REPLIES,
) -> list[dict[str, Any]]:
    """Preference pairs from replies to the same context with a positive vs a negative reaction.

    Each pair is ``{"id", "prompt", "chosen", "rejected", "chosen_delta", "rejected_delta", "source":
    "feedback", "sessions": [chosen session, rejected session], "turns": [chosen turn, rejected turn],
    "context": context key}``, sorted by id; the output does not depend on the order of ``sessions``.

    ``margin_share`` below 1 keeps only that share of all the positive x negative combinations (every context
    together), those with the widest reaction margins (ties at the cut are kept), before the per-context cap.
    ``cut_replies`` says what a reply cut off at the token limit may be (:data:`CutReplies`).
    """
    check_pair_options(max_pairs_per_context, selection, margin_share)
    check_cut_replies(cut_replies)
    ids = [s.session_id for s in sessions]
    if len(set(ids)) != len(ids):
        raise ValueError("session ids must be unique")
    groups: dict[str, list[_Reply]] = defaultdict(list)
    for session in sessions:
        for key, reply in _replies(session, cut_replies):
            groups[key].append(reply)
    by_context: dict[str, list[tuple[_Reply, _Reply]]] = {}
    for key in sorted(groups):
        replies = sorted(groups[key], key=lambda r: (r.session_id, r.turn_id))
        # A cut reply (not trimmed) as the chosen side would teach the model to stop mid-sentence; as the rejected
        # side it only lowers the odds of a reply the user did not like, cut or not.
        positives = [r for r in replies if r.flagged and not r.at_limit]
        negatives = [r for r in replies if not r.flagged]
        by_context[key] = [
            (p, n)
            for p in positives
            for n in negatives
            # The same words cannot be both better and worse: no preference signal.
            if normalise_text(p.text) != normalise_text(n.text)
        ]
    cutoff = _top_share_cutoff([_margin(*c) for cs in by_context.values() for c in cs], margin_share)
    pairs: dict[str, dict[str, Any]] = {}
    for key, candidates in by_context.items():
        candidates = [c for c in candidates if _margin(*c) >= cutoff]
        _group_rng(seed, key).shuffle(candidates)
        if selection == "margin":
            candidates.sort(key=lambda pair: _margin(*pair), reverse=True)  # Stable: ties keep the seeded order.
        for chosen, rejected in candidates[:max_pairs_per_context]:
            prompt = [dict(m) for m in (chosen.prompt_with_readouts if include_readouts else chosen.prompt)]
            body = {"prompt": prompt, "chosen": chosen.text, "rejected": rejected.text}
            pair_id = content_id(body)
            # Identical (prompt, chosen, rejected) from different sessions would be one example twice.
            pairs.setdefault(
                pair_id,
                {
                    "id": pair_id,
                    **body,
                    "chosen_delta": chosen.delta,
                    "rejected_delta": rejected.delta,
                    "source": "feedback",
                    "sessions": [chosen.session_id, rejected.session_id],
                    "turns": [chosen.turn_id, rejected.turn_id],
                    "context": key,
                },
            )
    return [pairs[k] for k in sorted(pairs)]


# --- manifests ------------------------------------------------------------------------------------------


def _record_sessions(kind: DatasetKind, record: Mapping[str, Any]) -> list[str]:
    if kind == "sft":
        # EmpatheticDialogues SFT records come from a corpus, not from anyone's session: no session to withdraw or
        # to trace a model's lineage to (the manifest's label_settings name the corpus split instead).
        return [] if record.get("source") == "empathetic" else [str(record["session_id"])]
    if kind == "dpo_feedback":
        return [str(s) for s in record["sessions"]]
    # EmpatheticDialogues pairs: the conversations whose replies they use.
    return [str(record["conv_id"]), str(record["rejected_conv_id"])]


def _counts(kind: DatasetKind, records: Sequence[Mapping[str, Any]], sessions: Sequence[str]) -> dict[str, int]:
    if kind == "sft":
        weights = [m.get("weight") for r in records for m in r["messages"] if m["role"] == "assistant"]
        return {
            "examples": len(records),
            "sessions": len(sessions),
            "assistant_turns": len(weights),
            "flagged_turns": sum(1 for w in weights if w == 1),
        }
    return {
        "examples": len(records),
        "pairs": len(records),
        "sessions": len(sessions),
        "prompts": len({content_id(r["prompt"]) for r in records}),
    }


@dataclass(frozen=True)
class DatasetManifest:
    """What a dataset file holds and how it was made; ``id`` depends only on kind, content and settings."""

    id: str
    kind: DatasetKind
    content_hash: str  # sha256 (hex) of the JSONL bytes.
    counts: dict[str, int]
    source_sessions: list[str]  # Sorted, unique; EmpatheticDialogues conv_ids for "dpo_empathetic", none for its SFT.
    label_settings: dict[str, Any]
    created_from: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        kind: DatasetKind,
        records: Sequence[Mapping[str, Any]],
        label_settings: Mapping[str, Any],
        created_from: Mapping[str, Any] | None = None,
    ) -> DatasetManifest:
        """The manifest of ``records`` as :func:`write_jsonl` would write them."""
        if kind not in DATASET_KINDS:
            raise ValueError(f"unknown dataset kind {kind!r}")
        content_hash = hashlib.sha256(jsonl_bytes(records)).hexdigest()
        sessions = sorted({s for r in records for s in _record_sessions(kind, r)})
        settings = dict(label_settings)
        # created_from is free-form (it may hold times or paths), so it stays out of the id.
        manifest_id = content_id({"kind": kind, "content_hash": content_hash, "label_settings": settings})
        return cls(
            id=manifest_id,
            kind=kind,
            content_hash=content_hash,
            counts=_counts(kind, records, sessions),
            source_sessions=sessions,
            label_settings=settings,
            created_from=dict(created_from or {}),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
