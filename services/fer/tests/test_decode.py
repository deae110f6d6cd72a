"""The decoder refuses every bad input with a message naming the problem."""

from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np
import pytest

from emili_core.errors import InvalidInput
from emili_fer.decode import Format, declared_pixels, decode

LIMITS = {"max_bytes": 8 * 1024 * 1024, "max_pixels": 4096 * 4096}


def _png(image: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", image)
    assert ok
    return data.tobytes()


def _with_png_size(png: bytes, width: int, height: int) -> bytes:
    """Rewrite the IHDR dimensions (and CRC) of a valid PNG: a tiny file that claims a huge image."""
    ihdr = b"IHDR" + struct.pack(">II", width, height) + png[24:29]
    return png[:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + png[33:]


def test_zero_bytes() -> None:
    with pytest.raises(InvalidInput, match="empty"):
        decode(b"", **LIMITS)


def test_not_an_image() -> None:
    with pytest.raises(InvalidInput, match="not a JPEG or PNG"):
        decode(b"hello, this is text", **LIMITS)


def test_truncated_jpeg(face_jpeg: bytes) -> None:
    with pytest.raises(InvalidInput, match="truncated"):
        decode(face_jpeg[: len(face_jpeg) // 2], **LIMITS)
    with pytest.raises(InvalidInput, match=r"truncated|corrupt"):
        decode(face_jpeg[:40], **LIMITS)


def test_corrupt_jpeg_body(face_jpeg: bytes) -> None:
    data = bytearray(face_jpeg)
    data[2:4] = b"\x00\x00"  # Destroy the first marker.
    with pytest.raises(InvalidInput, match="corrupt"):
        decode(bytes(data), **LIMITS)


def test_oversized_bytes(face_jpeg: bytes) -> None:
    with pytest.raises(InvalidInput, match="over the 1024-byte limit"):
        decode(face_jpeg, max_bytes=1024, max_pixels=LIMITS["max_pixels"])


def test_10000_by_10000_image_refused_before_decoding() -> None:
    bomb = _with_png_size(_png(np.zeros((8, 8), np.uint8)), 10000, 10000)
    with pytest.raises(InvalidInput, match="10000x10000 = 100000000 pixels, over the"):
        decode(bomb, **LIMITS)


def test_truncated_png() -> None:
    png = _png(np.zeros((32, 32), np.uint8))
    with pytest.raises(InvalidInput, match="truncated"):
        decode(png[:-20], **LIMITS)


def test_png_with_alpha_decodes_to_gray() -> None:
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., 2] = 200
    rgba[..., 3] = 128
    image, reduction = decode(_png(rgba), **LIMITS)
    assert image.shape == (20, 30) and image.dtype == np.uint8 and reduction == 1
    assert image.mean() > 0


def test_gray_jpeg_decodes_to_colour_when_asked(face_jpeg: bytes) -> None:
    gray = cv2.imdecode(np.frombuffer(face_jpeg, np.uint8), cv2.IMREAD_GRAYSCALE)
    _ok, data = cv2.imencode(".jpg", gray)
    image, _ = decode(data.tobytes(), gray=False, **LIMITS)
    assert image.shape == (480, 640, 3)


def test_jpeg_reduction_keeps_minimum_width(face_jpeg: bytes) -> None:
    image, reduction = decode(face_jpeg, max_reduction=8, min_width=200, **LIMITS)
    assert reduction == 2 and image.shape == (240, 320)


def test_raw_frames() -> None:
    gray, _ = decode(bytes(12), Format.RAW_GRAY8, 4, 3, **LIMITS)
    assert gray.shape == (3, 4)
    bgr, _ = decode(bytes(36), Format.RAW_BGR24, 4, 3, gray=False, **LIMITS)
    assert bgr.shape == (3, 4, 3)
    with pytest.raises(InvalidInput, match="needs 12 bytes, got 11"):
        decode(bytes(11), Format.RAW_GRAY8, 4, 3, **LIMITS)
    with pytest.raises(InvalidInput, match="width and height"):
        decode(bytes(12), Format.RAW_GRAY8, **LIMITS)


def test_declared_pixels_come_from_the_header_without_decoding(face_jpeg: bytes) -> None:
    height, width = cv2.imdecode(np.frombuffer(face_jpeg, np.uint8), cv2.IMREAD_GRAYSCALE).shape
    assert declared_pixels(face_jpeg) == width * height
    tiny = _png(np.zeros((8, 8), np.uint8))
    assert declared_pixels(_with_png_size(tiny, 4096, 4096)) == 4096 * 4096  # A claim, never decoded.
    assert declared_pixels(b"", Format.RAW_GRAY8, 640, 480) == 640 * 480
    assert declared_pixels(b"garbage") == 0 and declared_pixels(face_jpeg[:100]) == 0  # Decoding reports those.
