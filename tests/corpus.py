"""A corpus of bad and unusual inputs, generated on the fly (no binary fixtures)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import cv2
import numpy as np


def _png_with_size(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but holds almost no data (decompression bomb)."""
    ok, buf = cv2.imencode(".png", np.zeros((2, 2, 3), np.uint8))
    data = bytearray(buf.tobytes())
    ihdr_start = 8 + 8  # signature, then length + b"IHDR"
    data[ihdr_start : ihdr_start + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12 : ihdr_start + 13])) & 0xFFFFFFFF
    data[ihdr_start + 13 : ihdr_start + 17] = struct.pack(">I", crc)
    return bytes(data)


def write_bad_corpus(root: Path, good_jpeg: bytes) -> dict[str, str]:
    """Write bad inputs under ``root``; returns file name -> expected outcome ("ok" or "error")."""
    root.mkdir(parents=True, exist_ok=True)
    rgb = cv2.imdecode(np.frombuffer(good_jpeg, np.uint8), cv2.IMREAD_COLOR)
    files: dict[str, tuple[bytes, str]] = {
        "zero-byte.jpg": (b"", "error"),
        "truncated.jpg": (good_jpeg[: len(good_jpeg) // 2], "error"),
        "random-bytes.jpg": (np.random.default_rng(0).bytes(5000), "error"),
        "text.png": (b"this is not an image\n" * 20, "error"),
        "tiny-1x1.png": (cv2.imencode(".png", np.zeros((1, 1, 3), np.uint8))[1].tobytes(), "error"),
        "bomb-20000x20000.png": (_png_with_size(20000, 20000), "error"),
        "rgba.png": (cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_BGR2BGRA))[1].tobytes(), "ok"),
        "sixteen-bit.png": (cv2.imencode(".png", rgb.astype(np.uint16) * 257)[1].tobytes(), "ok"),
        "grey.jpg": (cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_BGR2GRAY))[1].tobytes(), "ok"),
        "ünïcode name with spaces.jpg": (good_jpeg, "ok"),
    }
    for name, (data, _) in files.items():
        (root / name).write_bytes(data)
    return {name: outcome for name, (_, outcome) in files.items()}
