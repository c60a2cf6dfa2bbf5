"""Decoding, validating and resizing cell images with OpenCV.

Every path that feeds the model (classify, train, evaluate, explain) goes
through :func:`decode_image` and :func:`wbc_batch.geometry.model_input`
(which resizes with :func:`resize_for_model`), so the model sees exactly the
preprocessing it was trained with.
"""

from __future__ import annotations

import os

# Refuse decompression bombs before OpenCV allocates: 60 megapixels is far
# above any microscope tile and far below what would exhaust a worker.
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(60_000_000))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
MAX_IMAGE_BYTES = 64 * 1024 * 1024
MIN_SIDE = 16
MAX_PIXELS = 60_000_000


class ImageDecodeError(ValueError):
    """An input that cannot be turned into an RGB cell image."""


def is_image_name(name: str) -> bool:
    """True when a file or key name has one of the supported image extensions."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _sniff_format(data: bytes) -> str | None:
    """Return the container format from the magic bytes, or None if unknown."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if data[:2] == b"BM":
        return "bmp"
    return None


def decode_image(data: bytes) -> np.ndarray:
    """Decode image bytes to an RGB uint8 array.

    Grayscale is replicated to 3 channels, alpha is dropped, 16-bit is
    scaled to 8-bit and EXIF orientation is applied (OpenCV's IMREAD_COLOR
    does all of these), which is sound for stained smears.

    Args:
        data: the encoded file content.

    Returns:
        (H, W, 3) uint8 RGB.

    Raises:
        ImageDecodeError: empty, unknown, truncated, too large or too small input.
    """
    if len(data) == 0:
        raise ImageDecodeError("empty file (0 bytes)")
    if len(data) > MAX_IMAGE_BYTES:
        raise ImageDecodeError(f"file too large: {len(data)} bytes > {MAX_IMAGE_BYTES}")
    fmt = _sniff_format(data)
    if fmt is None:
        raise ImageDecodeError("not an image: unrecognised file signature")
    if fmt == "jpeg" and not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        raise ImageDecodeError("truncated JPEG: no end-of-image marker")
    buf = np.frombuffer(data, dtype=np.uint8)
    try:
        bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    except cv2.error as exc:  # OpenCV raises for oversize headers
        raise ImageDecodeError(f"cannot decode {fmt}: {exc.msg if hasattr(exc, 'msg') else exc}") from None
    if bgr is None:
        raise ImageDecodeError(f"cannot decode {fmt}: corrupt data or more than {MAX_PIXELS} pixels")
    h, w = bgr.shape[:2]
    if min(h, w) < MIN_SIDE:
        raise ImageDecodeError(f"image too small: {w}x{h}, expected at least {MIN_SIDE}x{MIN_SIDE}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def resize_for_model(rgb: np.ndarray, image_size: int) -> np.ndarray:
    """Resize an RGB image to the model's square input with area averaging.

    Args:
        rgb: (H, W, 3) uint8.
        image_size: output side S.

    Returns:
        (S, S, 3) uint8.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected (H, W, 3), got {rgb.shape}")
    return cv2.resize(rgb, (image_size, image_size), interpolation=cv2.INTER_AREA)


def encode_jpeg(rgb: np.ndarray, quality: int = 90) -> bytes:
    """Encode an RGB uint8 image as JPEG bytes."""
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buf.tobytes()
