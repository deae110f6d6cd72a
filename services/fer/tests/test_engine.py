"""The FER pipeline on a real face with the real converted model."""

from __future__ import annotations

import asyncio

import cv2
import numpy as np
import pytest

from emili_core.errors import InvalidInput
from emili_fer.decode import Format
from emili_fer.detect import Box, square_crop
from emili_fer.engine import FerEngine, FrameInput, Reading
from emili_fer.settings import FerOptions
from emili_session.emotions import EMOTIONS

from .conftest import artifacts_dir


def _noise_jpeg() -> bytes:
    rng = np.random.default_rng(0)
    _ok, data = cv2.imencode(".jpg", rng.integers(0, 255, (480, 640), np.uint8))
    return data.tobytes()


def test_real_face_reads_as_happy(loaded_engine: FerEngine, face_jpeg: bytes) -> None:
    (reading,) = loaded_engine.analyze_sync([FrameInput(face_jpeg)])
    assert isinstance(reading, Reading)
    assert reading.face_found and reading.face_count == 1
    assert list(reading.probabilities) == list(EMOTIONS)
    assert sum(reading.probabilities.values()) == pytest.approx(1.0, abs=1e-4)
    assert reading.top_emotion == "happy"  # The astronaut is smiling.
    assert reading.salience["happy"] >= 90
    assert reading.box is not None and 150 <= reading.box.height <= 260  # In full-frame pixels.
    assert reading.timings.decode_ms > 0 and reading.timings.detect_ms > 0


def test_frame_without_a_face(loaded_engine: FerEngine) -> None:
    (reading,) = loaded_engine.analyze_sync([FrameInput(_noise_jpeg())])
    assert isinstance(reading, Reading)
    assert not reading.face_found and reading.face_count == 0
    assert reading.probabilities == {} and reading.top_emotion == "" and reading.box is None


def test_small_face_is_ignored_by_the_size_filter(face_jpeg: bytes) -> None:
    image = cv2.imdecode(np.frombuffer(face_jpeg, np.uint8), cv2.IMREAD_COLOR)
    canvas = np.full((960, 1280, 3), 90, np.uint8)
    canvas[:480, :640] = image  # The face is now about a sixth of the frame height.
    _ok, data = cv2.imencode(".jpg", canvas)
    options = FerOptions()
    strict = FerEngine(options, artifacts_dir())
    assert strict.prepare(FrameInput(data.tobytes())).box is None
    lenient = FerEngine(
        options.model_copy(
            update={
                "detection": options.detection.model_copy(update={"min_face_height_ratio": 0.1, "detect_width": 384})
            }
        ),
        artifacts_dir(),
    )
    assert lenient.prepare(FrameInput(data.tobytes())).box is not None


def test_grayscale_and_alpha_inputs_give_the_same_emotion(loaded_engine: FerEngine, face_jpeg: bytes) -> None:
    image = cv2.imdecode(np.frombuffer(face_jpeg, np.uint8), cv2.IMREAD_COLOR)
    gray_png = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_BGR2GRAY))[1].tobytes()
    alpha_png = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_BGR2BGRA))[1].tobytes()
    readings = loaded_engine.analyze_sync([FrameInput(gray_png), FrameInput(alpha_png)])
    assert [r.top_emotion for r in readings if isinstance(r, Reading)] == ["happy", "happy"]


def test_bad_frame_is_a_per_item_error(loaded_engine: FerEngine, face_jpeg: bytes) -> None:
    results = loaded_engine.analyze_sync([FrameInput(b""), FrameInput(face_jpeg)])
    assert isinstance(results[0], InvalidInput) and "empty" in str(results[0])
    assert isinstance(results[1], Reading) and results[1].face_found


async def test_batched_and_single_results_are_identical(fer_options: FerOptions, face_jpeg: bytes) -> None:
    image = cv2.imdecode(np.frombuffer(face_jpeg, np.uint8), cv2.IMREAD_COLOR)
    frames = [FrameInput(face_jpeg)]
    for angle in (-8, 8):  # Slightly different faces, so the batch holds distinct inputs.
        matrix = cv2.getRotationMatrix2D((320, 240), angle, 1.0)
        frames.append(FrameInput(cv2.imencode(".jpg", cv2.warpAffine(image, matrix, (640, 480)))[1].tobytes()))
    frames.append(FrameInput(_noise_jpeg()))

    unbatched = FerEngine(
        fer_options.model_copy(update={"batching": fer_options.batching.model_copy(update={"max_batch_size": 1})}),
        artifacts_dir(),
    )
    batched = FerEngine(
        fer_options.model_copy(
            update={"batching": fer_options.batching.model_copy(update={"max_batch_size": 8, "max_wait_ms": 200})}
        ),
        artifacts_dir(),
    )
    for engine in (unbatched, batched):
        await engine.start()
    try:
        one_by_one = [await unbatched.analyze(f) for f in frames]
        together = await batched.analyze_many(frames)
    finally:
        await unbatched.stop()
        await batched.stop()
    for a, b in zip(one_by_one, together, strict=True):
        assert isinstance(b, Reading)
        assert a.face_found == b.face_found and a.box == b.box
        for label in a.probabilities:
            assert a.probabilities[label] == pytest.approx(b.probabilities[label], abs=1e-5)


def test_flip_tta_averages_both_views(fer_options: FerOptions, face_jpeg: bytes) -> None:
    engine = FerEngine(fer_options.model_copy(update={"flip_tta": True}), artifacts_dir())
    engine.load()
    prepared = engine.prepare(FrameInput(face_jpeg))
    assert prepared.tensor is not None
    plain = engine.classifier(prepared.tensor[None]).probabilities[0]  # type: ignore[misc]
    flipped = engine.classifier(prepared.tensor[None, :, ::-1]).probabilities[0]  # type: ignore[misc]
    (result,) = engine.run_batch(prepared.tensor[None])
    np.testing.assert_allclose(result.probabilities, (plain + flipped) / 2, atol=1e-6)


def test_square_crop_pads_beyond_the_frame() -> None:
    image = np.full((100, 100), 255, np.uint8)
    crop = square_crop(image, Box(80, 80, 20, 10), padding=0.5)
    assert crop.shape == (40, 40)
    assert crop[-1, -1] == 0 and crop[10, 10] == 255


async def test_analyze_before_start_is_not_ready(fer_options: FerOptions, face_jpeg: bytes) -> None:
    from emili_core.errors import NotReady

    engine = FerEngine(fer_options, artifacts_dir())
    with pytest.raises(NotReady):
        await engine.analyze(FrameInput(face_jpeg))
    await asyncio.sleep(0)


async def test_frames_beyond_capacity_are_refused(fer_options: FerOptions, face_jpeg: bytes) -> None:
    from emili_core.errors import Overloaded

    batching = fer_options.batching.model_copy(update={"queue_capacity": 2, "max_batch_size": 2})
    engine = FerEngine(fer_options.model_copy(update={"batching": batching}), artifacts_dir())
    await engine.start()
    try:
        results = await asyncio.gather(
            *(engine.analyze(FrameInput(face_jpeg)) for _ in range(5)), return_exceptions=True
        )
    finally:
        await engine.stop()
    assert [type(r).__name__ for r in results] == ["Reading", "Reading", "Overloaded", "Overloaded", "Overloaded"]
    assert "at capacity (2 frames" in str(results[2])
    assert isinstance(results[2], Overloaded)


def test_pixel_budget_counts_the_whole_request_before_decoding(face_jpeg: bytes) -> None:
    options = FerOptions()
    engine = FerEngine(
        options.model_copy(update={"limits": options.limits.model_copy(update={"max_pixels_per_request": 1280 * 720})}),
        artifacts_dir(),
    )
    assert engine.options.limits.max_pixels_per_request == 1280 * 720
    raw = FrameInput(bytes(640 * 360), Format.RAW_GRAY8, 640, 360)
    assert engine.check_pixel_budget([raw] * 4) == 1280 * 720  # Exactly the budget is allowed.
    with pytest.raises(InvalidInput, match=r"over 921600 pixels, the per-request budget"):
        engine.check_pixel_budget([raw] * 5)
    assert engine.check_pixel_budget([FrameInput(b"garbage")] * 100) == 0  # Decoding reports those, one by one.


def test_default_pixel_budget_is_64_hd_frames() -> None:
    assert FerOptions().limits.max_pixels_per_request == 64 * 1280 * 720


async def test_analyze_many_refuses_a_request_over_the_budget_without_decoding(face_jpeg: bytes) -> None:
    options = FerOptions()
    engine = FerEngine(
        options.model_copy(update={"limits": options.limits.model_copy(update={"max_pixels_per_request": 64 * 64})}),
        artifacts_dir(),
    )
    # Not started (no model, no thread pool): a frame that reached decoding would fail with NotReady instead.
    with pytest.raises(InvalidInput, match="per-request budget"):
        await engine.analyze_many([FrameInput(face_jpeg)])
    with pytest.raises(InvalidInput, match="per-request budget"):
        await engine.analyze(FrameInput(face_jpeg))


def test_pixel_budget_is_set_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from emili_core.settings import load_settings
    from emili_fer.settings import FerSettings

    monkeypatch.setenv("EMILI_FER__LIMITS__MAX_PIXELS_PER_REQUEST", str(8 * 1920 * 1080))
    assert load_settings(FerSettings).fer.limits.max_pixels_per_request == 8 * 1920 * 1080


def test_salience_is_floored_as_emili_shows_scores() -> None:
    reading = Reading(True, 1, None, {"happy": 0.106, "sad": 0.29, "neutral": 0.604}, "m")
    assert reading.salience == {"happy": 10, "sad": 29, "neutral": 60}
