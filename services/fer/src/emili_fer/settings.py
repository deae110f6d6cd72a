"""The FER service's one settings class. Environment: ``EMILI_FER__<FIELD>`` (and the common ``EMILI_*``)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import BaseModel, Field, model_validator

from emili_core.settings import CommonSettings, ServerSettings, WorkerSettings

DEFAULT_MANIFEST = Path(__file__).parent / "models" / "mini_xception.yaml"


class DetectionSettings(BaseModel):
    """OpenCV Haar cascade. The original EMILI used scale 1.3, 5 neighbours, faces over 150 px of 450."""

    cascade: str = "haarcascade_frontalface_default.xml"  # Under cv2.data.haarcascades, or a path.
    scale_factor: float = Field(1.25, gt=1.0, le=2.0)
    min_neighbors: int = Field(5, ge=0, le=50)
    # Detection runs on a copy this wide (or narrower): its cost grows with the pixel count, and a
    # face a quarter of the frame tall is still 36 px here, above the cascade's 24 px window.
    detect_width: int = Field(192, ge=64, le=4096)
    # Smallest face kept, as a share of the frame height (the original: 150/450 = 0.33).
    min_face_height_ratio: float = Field(0.25, ge=0.0, le=1.0)
    # JPEGs may be decoded at 1/2, 1/4 or 1/8 size (libjpeg scales in the DCT, far cheaper than
    # resizing), never below twice the detection width so the face crop keeps enough pixels.
    max_decode_reduction: Literal[1, 2, 4, 8] = 2
    box_padding: float = Field(0.1, ge=0.0, le=1.0)  # Added on each side after squaring the box.


class LimitSettings(BaseModel):
    max_frame_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    max_frame_pixels: int = Field(4096 * 4096, ge=64 * 64)  # Checked from the header, before decoding.
    max_batch_frames: int = Field(256, ge=1)  # Frames per AnalyzeBatch call.
    # Decoded pixels (width x height, from the headers, before decoding) of all the frames of one Analyze or
    # AnalyzeBatch request: 64 frames of 1280x720. Decoding costs CPU by the pixel, not by the byte sent.
    max_pixels_per_request: int = Field(64 * 1280 * 720, ge=64 * 64)


class BatchingSettings(BaseModel):
    max_batch_size: int = Field(64, ge=1, le=4096)
    max_wait_ms: float = Field(4.0, ge=0.0, le=1000.0)
    queue_capacity: int = Field(512, ge=1)  # Frames in progress at once; beyond it: RESOURCE_EXHAUSTED.
    pipeline_threads: int = Field(2, ge=1, le=64)  # Decode + detect + crop run on this many threads.


class FerServerSettings(ServerSettings):
    grpc_port: int = Field(50051, ge=0, le=65535)
    metrics_port: int = Field(9101, ge=0, le=65535)


class FerWorkerSettings(WorkerSettings):
    metrics_port: int = Field(9111, ge=0, le=65535)
    concurrency: int = Field(1, ge=1)


class FerOptions(BaseModel):
    server: FerServerSettings = FerServerSettings()
    worker: FerWorkerSettings = FerWorkerSettings()
    manifest: Path = DEFAULT_MANIFEST
    device: Literal["cpu", "cuda"] = "cpu"
    intra_op_threads: int = Field(1, ge=0, le=64)  # onnxruntime threads per call; 0 = onnxruntime's default.
    flip_tta: bool = False  # Average with the horizontally flipped face.
    detection: DetectionSettings = DetectionSettings()
    limits: LimitSettings = LimitSettings()
    batching: BatchingSettings = BatchingSettings()
    video_fps: float = Field(1.0, gt=0.0, le=60.0)  # Sampling rate when ingesting uploaded videos.
    max_video_frames: int = Field(36_000, ge=1)

    @model_validator(mode="after")
    def _batch_fits_queue(self) -> FerOptions:
        if self.batching.max_batch_size > self.batching.queue_capacity:
            raise ValueError("batching.max_batch_size must not exceed batching.queue_capacity")
        return self


class FerSettings(CommonSettings):
    service_name: ClassVar[str] = "fer"
    fer: FerOptions = FerOptions()
