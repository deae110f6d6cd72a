"""Frame decoding with explicit limits: every bad input becomes an ``InvalidInput`` naming the problem.

Image dimensions are read from the JPEG/PNG header before decoding, so a small file that
declares a huge image (a decompression bomb) is refused without allocating its pixels.
"""

from __future__ import annotations

import enum
import struct

import cv2
import numpy as np

from emili_core.errors import InvalidInput


class Format(enum.Enum):
    AUTO = "auto"
    JPEG = "jpeg"
    PNG = "png"
    RAW_GRAY8 = "raw_gray8"
    RAW_BGR24 = "raw_bgr24"


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SOI = b"\xff\xd8"
JPEG_EOI = b"\xff\xd9"
# Start-of-frame markers carry the size; C4 (DHT), C8 (JPG) and CC (DAC) share the range but do not.
_SOF_MARKERS = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def sniff(data: bytes) -> Format:
    if data.startswith(JPEG_SOI):
        return Format.JPEG
    if data.startswith(PNG_SIGNATURE):
        return Format.PNG
    raise InvalidInput(
        f"frame is not a JPEG or PNG image (first bytes {data[:8].hex()}); set the format for raw frames"
    )


def png_size(data: bytes) -> tuple[int, int]:
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise InvalidInput("PNG frame is truncated or corrupt: no IHDR header")
    width, height = struct.unpack(">II", data[16:24])
    if b"IEND" not in data[-12:]:
        raise InvalidInput("PNG frame is truncated: no IEND chunk at the end")
    return width, height


def jpeg_size(data: bytes) -> tuple[int, int]:
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            raise InvalidInput(f"JPEG frame is corrupt: expected a marker at byte {i}")
        marker = data[i + 1]
        if marker == 0xFF:  # Fill byte.
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # Markers without a length.
            i += 2
            continue
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        if marker in _SOF_MARKERS:
            if i + 9 > len(data):
                break
            height, width = struct.unpack(">HH", data[i + 5 : i + 9])
            if not data.rstrip(b"\x00").endswith(JPEG_EOI):
                raise InvalidInput("JPEG frame is truncated: it does not end with the end-of-image marker")
            return width, height
        i += 2 + length
    raise InvalidInput("JPEG frame is truncated or corrupt: no frame header found")


def declared_pixels(data: bytes, fmt: Format = Format.AUTO, width: int = 0, height: int = 0) -> int:
    """The pixel count a frame declares, read from its header without decoding (raw frames: ``width * height``);
    0 for a frame whose header cannot be read (decoding it reports the problem)."""
    try:
        if fmt is Format.AUTO:
            fmt = sniff(data)
        if fmt in (Format.RAW_GRAY8, Format.RAW_BGR24):
            return max(width, 0) * max(height, 0)
        w, h = jpeg_size(data) if fmt is Format.JPEG else png_size(data)
    except (InvalidInput, struct.error):
        return 0
    return w * h


def decode(
    data: bytes,
    fmt: Format = Format.AUTO,
    width: int = 0,
    height: int = 0,
    *,
    gray: bool = True,
    max_reduction: int = 1,
    min_width: int = 0,
    max_bytes: int,
    max_pixels: int,
) -> tuple[np.ndarray, int]:
    """Decode to uint8 gray (H, W) or BGR (H, W, 3), and the factor it was reduced by.

    A JPEG is decoded at 1/2, 1/4 or 1/8 size (up to ``max_reduction``) while it stays at least
    ``min_width`` wide; other formats are decoded at full size (factor 1).
    """
    if not data:
        raise InvalidInput("frame is empty (0 bytes)")
    if len(data) > max_bytes:
        raise InvalidInput(f"frame is {len(data)} bytes, over the {max_bytes}-byte limit")
    if fmt is Format.AUTO:
        fmt = sniff(data)
    if fmt in (Format.RAW_GRAY8, Format.RAW_BGR24):
        return _raw(data, fmt, width, height, gray=gray, max_pixels=max_pixels), 1
    if fmt is Format.JPEG and not data.startswith(JPEG_SOI):
        raise InvalidInput("frame declared JPEG but does not start with the JPEG signature")
    if fmt is Format.PNG and not data.startswith(PNG_SIGNATURE):
        raise InvalidInput("frame declared PNG but does not start with the PNG signature")
    w, h = jpeg_size(data) if fmt is Format.JPEG else png_size(data)
    if w == 0 or h == 0:
        raise InvalidInput(f"frame declares an empty image ({w}x{h})")
    if w * h > max_pixels:
        raise InvalidInput(f"frame is {w}x{h} = {w * h} pixels, over the {max_pixels}-pixel limit")
    reduction = 1
    if fmt is Format.JPEG:
        while reduction * 2 <= max_reduction and w // (reduction * 2) >= min_width:
            reduction *= 2
    image = cv2.imdecode(np.frombuffer(data, np.uint8), _imread_flags(gray, reduction))
    if image is None:
        raise InvalidInput(f"frame could not be decoded as {fmt.value.upper()}: corrupt data")
    if not gray and image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    return image, reduction


def _imread_flags(gray: bool, reduction: int) -> int:
    reduced = {
        (True, 2): cv2.IMREAD_REDUCED_GRAYSCALE_2,
        (True, 4): cv2.IMREAD_REDUCED_GRAYSCALE_4,
        (True, 8): cv2.IMREAD_REDUCED_GRAYSCALE_8,
        (False, 2): cv2.IMREAD_REDUCED_COLOR_2,
        (False, 4): cv2.IMREAD_REDUCED_COLOR_4,
        (False, 8): cv2.IMREAD_REDUCED_COLOR_8,
    }
    # IMREAD_COLOR drops a PNG's alpha channel; IMREAD_GRAYSCALE converts colour and 16-bit input.
    return reduced.get((gray, reduction), cv2.IMREAD_GRAYSCALE if gray else cv2.IMREAD_COLOR)


def _raw(data: bytes, fmt: Format, width: int, height: int, *, gray: bool, max_pixels: int) -> np.ndarray:
    if width <= 0 or height <= 0:
        raise InvalidInput("raw frames need width and height")
    if width * height > max_pixels:
        raise InvalidInput(f"frame is {width}x{height} = {width * height} pixels, over the {max_pixels}-pixel limit")
    channels = 1 if fmt is Format.RAW_GRAY8 else 3
    expected = width * height * channels
    if len(data) != expected:
        raise InvalidInput(f"raw {fmt.value} frame of {width}x{height} needs {expected} bytes, got {len(data)}")
    image = np.frombuffer(data, np.uint8).reshape((height, width) if channels == 1 else (height, width, 3))
    if gray and channels == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    if not gray and channels == 1:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    return image
