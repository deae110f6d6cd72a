"""The FER data plane, free of any transport: frames in, ``Reading``s out.

``prepare`` (decode, detect, crop, normalise) is CPU work run on a thread pool; the model call
is shared across all concurrent callers by the micro-batcher. gRPC servicers, Celery tasks and the
CLI all go through this class.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from emili_core.errors import EmiliError, InvalidInput, NotReady, Overloaded
from emili_fer.batcher import MicroBatcher
from emili_fer.decode import Format, declared_pixels, decode
from emili_fer.detect import Box, FaceDetector, square_crop
from emili_fer.manifest import ModelManifest, load_manifest
from emili_fer.metrics import fer_metrics
from emili_fer.model import OnnxClassifier
from emili_fer.preprocess import Preprocessor
from emili_fer.settings import FerOptions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FrameInput:
    data: bytes
    format: Format = Format.AUTO
    width: int = 0
    height: int = 0


@dataclass
class Timings:
    decode_ms: float = 0.0
    detect_ms: float = 0.0
    classify_ms: float = 0.0
    total_ms: float = 0.0


@dataclass
class Reading:
    face_found: bool
    face_count: int
    box: Box | None
    probabilities: dict[str, float]  # In the model's label order; empty without a face.
    model_id: str
    timings: Timings = field(default_factory=Timings)
    extras: dict[str, float] = field(default_factory=dict)

    @property
    def top_emotion(self) -> str:
        return max(self.probabilities, key=self.probabilities.__getitem__) if self.probabilities else ""

    @property
    def salience(self) -> dict[str, int]:
        """0-100 scores, as EMILI's readouts show them: the integer part (the original floors; 0.106 is 10, not 11).
        The tiny allowance keeps float error from costing a point (0.29 * 100 is 28.999...)."""
        return {label: min(100, math.floor(p * 100 + 1e-9)) for label, p in self.probabilities.items()}

    def to_json(self) -> dict[str, object]:
        return {
            "face_found": self.face_found,
            "face_count": self.face_count,
            "box": None if self.box is None else vars(self.box),
            "probabilities": self.probabilities,
            "salience": self.salience,
            "top_emotion": self.top_emotion,
            "model_id": self.model_id,
            "extras": self.extras,
            "timings_ms": vars(self.timings),
        }


@dataclass
class Prepared:
    tensor: np.ndarray | None  # None when no face was found.
    face_count: int
    box: Box | None
    timings: Timings


@dataclass(frozen=True)
class ModelResult:
    probabilities: np.ndarray
    extras: dict[str, float]


class FerEngine:
    def __init__(self, options: FerOptions, artifacts_dir: Path) -> None:
        self.options = options
        self.manifest: ModelManifest = load_manifest(options.manifest, artifacts_dir)
        self.detector = FaceDetector(options.detection)
        self.preprocess = Preprocessor(self.manifest)
        self.metrics = fer_metrics()
        self.classifier: OnnxClassifier | None = None
        self.batcher: MicroBatcher[ModelResult] | None = None
        self._pool: ThreadPoolExecutor | None = None
        # Frames admitted and not yet answered. Bounded, so a flood is refused instead of queueing
        # without limit in front of the pipeline threads.
        self._in_flight = 0

    # --- lifecycle -------------------------------------------------------------------------------

    def load(self) -> None:
        """Load, check and warm the model (blocking; the server runs it before reporting SERVING)."""
        self.classifier = OnnxClassifier(self.manifest, self.options.device, self.options.intra_op_threads)
        self.classifier.check_device()
        self.classifier.warm_up(self.options.batching.max_batch_size)
        self.warm_up_pipeline()

    def warm_up_pipeline(self) -> None:
        frame = np.full((480, 640), 128, np.uint8)
        self.detector.detect(frame)

    async def start(self) -> None:
        await asyncio.to_thread(self.load)
        b = self.options.batching
        self._pool = ThreadPoolExecutor(max_workers=b.pipeline_threads, thread_name_prefix="fer-pipeline")
        self.batcher = MicroBatcher(
            self.run_batch,
            max_batch_size=b.max_batch_size,
            max_wait_s=b.max_wait_ms / 1000.0,
            capacity=b.queue_capacity,
            on_batch=self.metrics.batch_size.observe,
        )
        self.batcher.start()
        self.metrics.queue_depth.set_function(lambda: float(self._in_flight))

    async def stop(self) -> None:
        if self.batcher is not None:
            await self.batcher.stop()
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    # --- stages ----------------------------------------------------------------------------------

    def prepare(self, frame: FrameInput) -> Prepared:
        """Decode, detect the largest face, crop and normalise it. Raises ``InvalidInput``."""
        limits, detection_settings = self.options.limits, self.options.detection
        t0 = time.perf_counter()
        image, reduction = decode(
            frame.data,
            frame.format,
            frame.width,
            frame.height,
            gray=self.manifest.color == "gray",
            max_reduction=detection_settings.max_decode_reduction,
            min_width=2 * detection_settings.detect_width,
            max_bytes=limits.max_frame_bytes,
            max_pixels=limits.max_frame_pixels,
        )
        t1 = time.perf_counter()
        detection = self.detector.detect(image if image.ndim == 2 else _to_gray(image))
        tensor, box = None, None
        if detection.box is not None:
            tensor = self.preprocess(square_crop(image, detection.box, detection_settings.box_padding))
            box = detection.box.scaled(reduction)  # Reported in the coordinates of the full frame.
        t2 = time.perf_counter()
        timings = Timings(decode_ms=(t1 - t0) * 1e3, detect_ms=(t2 - t1) * 1e3)
        self.metrics.stage_seconds.labels("decode").observe(t1 - t0)
        self.metrics.stage_seconds.labels("detect").observe(t2 - t1)
        return Prepared(tensor, detection.face_count, box, timings)

    def run_batch(self, batch: np.ndarray) -> list[ModelResult]:
        """One model call for a batch of normalised faces (optionally with flipped copies averaged in)."""
        assert self.classifier is not None, "model not loaded"
        n = len(batch)
        if self.options.flip_tta:
            output = self.classifier(np.concatenate([batch, batch[:, :, ::-1]]))
            probabilities = (output.probabilities[:n] + output.probabilities[n:]) / 2.0
            extras = {k: (v[:n] + v[n:]) / 2.0 for k, v in output.extras.items()}
        else:
            output = self.classifier(batch)
            probabilities, extras = output.probabilities, output.extras
        return [ModelResult(probabilities[i], {k: float(v[i]) for k, v in extras.items()}) for i in range(n)]

    def _reading(self, prepared: Prepared, result: ModelResult | None, started: float) -> Reading:
        labels = self.manifest.labels
        probabilities = (
            {} if result is None else {label: float(p) for label, p in zip(labels, result.probabilities, strict=True)}
        )
        prepared.timings.total_ms = (time.perf_counter() - started) * 1e3
        self.metrics.frames.labels("face" if result is not None else "no_face").inc()
        return Reading(
            face_found=result is not None,
            face_count=prepared.face_count,
            box=prepared.box,
            probabilities=probabilities,
            model_id=self.manifest.id,
            timings=prepared.timings,
            extras={} if result is None else result.extras,
        )

    # --- async API (server) ----------------------------------------------------------------------

    def check_pixel_budget(self, frames: Sequence[FrameInput]) -> int:
        """The frames' declared pixels (from their headers, nothing decoded); ``InvalidInput`` naming the budget
        when they are over ``limits.max_pixels_per_request``."""
        budget = self.options.limits.max_pixels_per_request
        total = 0
        for frame in frames:
            total += declared_pixels(frame.data, frame.format, frame.width, frame.height)
            if total > budget:
                self.metrics.frames.labels("error").inc(len(frames))
                raise InvalidInput(
                    f"the request's {len(frames)} frame(s) declare over {budget} pixels, the per-request budget "
                    f"(limits.max_pixels_per_request, e.g. {budget // (1280 * 720)} frames of 1280x720); "
                    "send smaller frames or fewer per request"
                )
        return total

    async def analyze(self, frame: FrameInput) -> Reading:
        """One frame of its own request (Analyze, one StreamAnalyze frame): checked against the pixel budget."""
        self.check_pixel_budget([frame])
        return await self._analyze(frame)

    async def _analyze(self, frame: FrameInput) -> Reading:
        if self.batcher is None or self._pool is None:
            raise NotReady("FER model is still loading; retry shortly")
        capacity = self.options.batching.queue_capacity
        if self._in_flight >= capacity:
            self.metrics.frames.labels("error").inc()
            raise Overloaded(f"FER service is at capacity ({capacity} frames in progress); retry later")
        self._in_flight += 1
        started = time.perf_counter()
        try:
            prepared = await asyncio.get_running_loop().run_in_executor(self._pool, self.prepare, frame)
            result = None
            if prepared.tensor is not None:
                t = time.perf_counter()
                result = await self.batcher.submit(prepared.tensor)
                prepared.timings.classify_ms = (time.perf_counter() - t) * 1e3
                self.metrics.stage_seconds.labels("classify").observe(time.perf_counter() - t)
        except Exception:
            self.metrics.frames.labels("error").inc()
            raise
        finally:
            self._in_flight -= 1
        return self._reading(prepared, result, started)

    async def analyze_many(self, frames: Sequence[FrameInput]) -> list[Reading | EmiliError]:
        """Per-item results or errors, in order; unexpected errors propagate."""
        limit = self.options.limits.max_batch_frames
        if len(frames) > limit:
            raise InvalidInput(f"batch has {len(frames)} frames, over the limit of {limit}; split it")
        self.check_pixel_budget(frames)  # The whole request, before any frame is decoded.
        results = await asyncio.gather(*(self._analyze(f) for f in frames), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, EmiliError):
                raise result
        return list(results)  # type: ignore[arg-type]

    # --- sync API (workers, CLI): batches directly, no event loop --------------------------------

    def analyze_sync(self, frames: Sequence[FrameInput], batch_size: int = 64) -> list[Reading | EmiliError]:
        out: list[Reading | EmiliError] = []
        for start in range(0, len(frames), batch_size):
            chunk = frames[start : start + batch_size]
            started = time.perf_counter()
            prepared: list[Prepared | EmiliError] = []
            for frame in chunk:
                try:
                    prepared.append(self.prepare(frame))
                except EmiliError as exc:
                    self.metrics.frames.labels("error").inc()
                    prepared.append(exc)
            faces = [p for p in prepared if isinstance(p, Prepared) and p.tensor is not None]
            t = time.perf_counter()
            results = iter(self.run_batch(np.stack([p.tensor for p in faces])) if faces else [])  # type: ignore[misc]
            classify_ms = (time.perf_counter() - t) * 1e3
            for p in prepared:
                if isinstance(p, EmiliError):
                    out.append(p)
                    continue
                result = next(results) if p.tensor is not None else None
                p.timings.classify_ms = classify_ms if result is not None else 0.0
                out.append(self._reading(p, result, started))
        return out


def _to_gray(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
