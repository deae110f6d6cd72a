"""Protobuf at the edge: conversions between ``emili.fer.v1`` messages and the engine's types."""

from __future__ import annotations

from emili.fer.v1 import fer_pb2
from emili_core.errors import EmiliError, InvalidInput
from emili_core.grpc_server import status_for
from emili_fer.decode import Format
from emili_fer.engine import FrameInput, Reading

_FORMATS = {
    fer_pb2.FRAME_FORMAT_UNSPECIFIED: Format.AUTO,
    fer_pb2.FRAME_FORMAT_JPEG: Format.JPEG,
    fer_pb2.FRAME_FORMAT_PNG: Format.PNG,
    fer_pb2.FRAME_FORMAT_RAW_GRAY8: Format.RAW_GRAY8,
    fer_pb2.FRAME_FORMAT_RAW_BGR24: Format.RAW_BGR24,
}


def frame_from_pb(frame: fer_pb2.Frame) -> FrameInput:
    fmt = _FORMATS.get(frame.format)
    if fmt is None:
        raise InvalidInput(f"unknown frame format {frame.format}")
    return FrameInput(frame.data, fmt, frame.width, frame.height)


def reading_to_pb(reading: Reading) -> fer_pb2.Reading:
    salience = reading.salience
    t = reading.timings
    message = fer_pb2.Reading(
        face_found=reading.face_found,
        face_count=reading.face_count,
        scores=[
            fer_pb2.EmotionScore(emotion=label, probability=p, salience=salience[label])
            for label, p in reading.probabilities.items()
        ],
        top_emotion=reading.top_emotion,
        model_id=reading.model_id,
        timings=fer_pb2.StageTimings(
            decode_ms=t.decode_ms, detect_ms=t.detect_ms, classify_ms=t.classify_ms, total_ms=t.total_ms
        ),
        extra_outputs=reading.extras,
    )
    if reading.box is not None:
        b = reading.box
        message.box.CopyFrom(fer_pb2.Box(x=b.x, y=b.y, width=b.width, height=b.height))
    return message


def error_to_pb(exc: EmiliError) -> fer_pb2.ItemError:
    return fer_pb2.ItemError(code=status_for(exc).name, message=str(exc))
