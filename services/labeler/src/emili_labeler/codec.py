"""Protobuf at the edge: conversions between ``emili.labeler.v1`` messages and the engine's types."""

from __future__ import annotations

import json

from emili.labeler.v1 import labeler_pb2
from emili_labeler.engine import Dataset, SessionLabel, TextScores, Vad

_KINDS = {
    "sft": labeler_pb2.DATASET_KIND_SFT,
    "dpo_feedback": labeler_pb2.DATASET_KIND_DPO_FEEDBACK,
    "dpo_empathetic": labeler_pb2.DATASET_KIND_DPO_EMPATHETIC,
}


def texts_from_pb(request: labeler_pb2.ScoreTextsRequest) -> list[str]:
    return list(request.texts)


def vad_to_pb(vad: Vad) -> labeler_pb2.Vad:
    return labeler_pb2.Vad(valence=vad.valence, arousal=vad.arousal, dominance=vad.dominance)


def text_scores_to_pb(scores: TextScores) -> labeler_pb2.ScoreTextsResponse:
    response = labeler_pb2.ScoreTextsResponse(lexicon=scores.lexicon, oov_method=scores.oov_method)
    for score in scores.scores:
        message = labeler_pb2.TextScore(coverage=score.coverage, tokens=score.tokens)
        if score.vad is not None:
            message.vad.CopyFrom(vad_to_pb(score.vad))
        response.scores.append(message)
    return response


def session_label_to_pb(label: SessionLabel) -> labeler_pb2.SessionLabel:
    message = labeler_pb2.SessionLabel(
        session_id=label.session_id,
        user_id=label.user_id,
        model_arm=label.model_arm,
        lexicon=label.lexicon,
        settings_hash=label.settings_hash,
        key=label.key,
    )
    for turn in label.turns:
        flag = message.turns.add(turn_id=turn.turn_id, flagged=turn.flagged, reason=turn.reason)
        if turn.delta is not None:
            flag.delta = turn.delta
    for field, vad in (("pre", label.pre), ("post", label.post), ("delta", label.delta)):
        if vad is not None:
            getattr(message, field).CopyFrom(vad_to_pb(vad))
    return message


def dataset_to_pb(dataset: Dataset) -> labeler_pb2.DatasetManifest:
    return labeler_pb2.DatasetManifest(
        dataset_id=dataset.dataset_id,
        kind=_KINDS[dataset.kind],
        content_hash=dataset.content_hash,
        counts=dataset.counts,
        source_sessions=dataset.source_sessions,
        label_settings_json=json.dumps(dataset.label_settings, sort_keys=True),
        key=dataset.key,
    )
