"""The labeler's request side, free of any transport: typed requests in, typed answers out.

The gRPC servicer decodes with :mod:`emili_labeler.codec` and calls this class. The work itself is in
:mod:`emili_labeler.jobs` (which the Celery tasks call too) and the runtime's scorer; it blocks, so it runs on
threads. Requests are checked here, before any storage is touched, with messages a caller can act on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from emili_core.errors import InvalidInput
from emili_core.keys import check_session_id
from emili_core.records import dataset_manifest
from emili_labeler import jobs


@dataclass(frozen=True)
class Vad:
    valence: float
    arousal: float
    dominance: float

    @classmethod
    def from_json(cls, values: Mapping[str, float] | None) -> Vad | None:
        return None if values is None else cls(values["valence"], values["arousal"], values["dominance"])


@dataclass(frozen=True)
class TextScore:
    vad: Vad | None  # None when the text has no scorable words.
    coverage: float  # Share of the text's words found in the lexicon; 0 for a text without words.
    tokens: tuple[str, ...]


@dataclass(frozen=True)
class TextScores:
    scores: tuple[TextScore, ...]  # In the order of the texts asked for.
    lexicon: str
    oov_method: str


@dataclass(frozen=True)
class TurnFlag:
    turn_id: str
    flagged: bool
    delta: float | None  # None when there was no face data around the turn.
    reason: str


@dataclass(frozen=True)
class SessionLabel:
    session_id: str
    user_id: str
    model_arm: str
    lexicon: str
    settings_hash: str
    key: str  # Object key of the full label JSON (bucket sessions).
    pre: Vad | None
    post: Vad | None
    delta: Vad | None
    turns: tuple[TurnFlag, ...]

    @classmethod
    def from_json(cls, label: Mapping[str, Any]) -> SessionLabel:
        """From a stored label, as :func:`emili_labeler.jobs.label_session` writes it."""
        gold = label["gold"]
        return cls(
            session_id=label["session_id"],
            user_id=label["user_id"],
            model_arm=label["model_arm"],
            lexicon=gold["lexicon"],
            settings_hash=label["settings_hash"],
            key=label["key"],
            pre=Vad.from_json(gold["pre"]),
            post=Vad.from_json(gold["post"]),
            delta=Vad.from_json(gold["delta"]),
            turns=tuple(
                TurnFlag(turn_id=t["turn_id"] or "", flagged=t["flagged"], delta=t["delta"], reason=t["reason"])
                for t in label["turns"]
            ),
        )


@dataclass(frozen=True)
class Dataset:
    dataset_id: str
    kind: str  # sft, dpo_feedback or dpo_empathetic.
    content_hash: str
    counts: Mapping[str, int]
    source_sessions: tuple[str, ...]
    label_settings: Mapping[str, Any]
    key: str  # Object key of the JSONL (bucket datasets).

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> Dataset:
        """From a published manifest, as :func:`emili_labeler.jobs` writes it."""
        return cls(
            dataset_id=manifest["id"],
            kind=manifest["kind"],
            content_hash=manifest["content_hash"],
            counts=manifest["counts"],
            source_sessions=tuple(manifest["source_sessions"]),
            label_settings=manifest["label_settings"],
            key=manifest["key"],
        )


class LabelerEngine:
    """``runtime`` gives the loaded runtime, or raises NotReady while the lexicon and embeddings load."""

    def __init__(self, runtime: Callable[[], jobs.Runtime]) -> None:
        self._runtime = runtime

    @property
    def runtime(self) -> jobs.Runtime:
        return self._runtime()

    async def score_texts(self, texts: Sequence[str]) -> TextScores:
        runtime = self.runtime
        limit = runtime.settings.labeler.max_batch_texts
        if len(texts) > limit:
            raise InvalidInput(f"{len(texts)} texts in one request, over the limit of {limit}; split it")
        try:
            results = await asyncio.to_thread(runtime.scorer.score_batch, list(texts))
        except ValueError as exc:  # Over-long text, with a message naming the limit.
            raise InvalidInput(str(exc)) from exc
        return TextScores(
            scores=tuple(
                TextScore(
                    vad=None if r.vad is None else Vad(*r.vad),
                    coverage=r.coverage or 0.0,
                    tokens=tuple(r.tokens),
                )
                for r in results
            ),
            lexicon=runtime.scorer.lexicon.name,
            oov_method=runtime.settings.labeler.oov_method,
        )

    async def label_session(self, session_id: str) -> SessionLabel:
        """The session's label for the current settings: the stored one, or made and stored now."""
        check_session_id(session_id)
        label = await asyncio.to_thread(jobs.label_session, self.runtime, session_id)
        return SessionLabel.from_json(label)

    async def get_dataset(self, dataset_id: str) -> Dataset:
        manifest = await asyncio.to_thread(dataset_manifest, self.runtime.store, dataset_id)
        return Dataset.from_manifest(manifest)
