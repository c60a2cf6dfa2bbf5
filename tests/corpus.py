"""A corpus of bad and unusual inputs, generated on the fly (no binary fixtures).

``write_bad_corpus`` writes the files whose outcome is decided by decoding;
the inputs whose outcome is decided by listing or naming (symlinks, ``../``
keys, an empty input) have their own helpers below. ``README.md (Guarantees and failure handling)``
("Bad input: what happens") documents every outcome; ``EXPECTED_ERRORS``
holds the text each error row's message contains.
"""

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


def cmyk_jpeg(width: int = 32, height: int = 24, cmyk: tuple[int, int, int, int] = (60, 40, 90, 200)) -> bytes:
    """A baseline 4-component (CMYK) JPEG of one flat colour, written by hand.

    OpenCV cannot write CMYK, so this builds the stream directly: one
    quantisation table of 8s, no subsampling, a DC table with 4-bit codes
    for categories 0-8 and an AC table holding only end-of-block, so each
    8x8 block is its DC difference followed by EOB.
    """
    out = bytearray(b"\xff\xd8")
    out += b"\xff\xdb" + struct.pack(">H", 67) + b"\x00" + bytes([8] * 64)
    out += b"\xff\xc0" + struct.pack(">HBHHB", 8 + 3 * 4, 8, height, width, 4)
    out += b"".join(bytes([c + 1, 0x11, 0]) for c in range(4))
    dc_counts = [0] * 16
    dc_counts[3] = 9  # nine codes of length 4: categories 0..8
    out += b"\xff\xc4" + struct.pack(">H", 2 + 17 + 9) + b"\x00" + bytes(dc_counts) + bytes(range(9))
    ac_counts = [0] * 16
    ac_counts[0] = 1  # one code of length 1: EOB
    out += b"\xff\xc4" + struct.pack(">H", 2 + 17 + 1) + b"\x10" + bytes(ac_counts) + b"\x00"
    out += b"\xff\xda" + struct.pack(">HB", 6 + 2 * 4, 4) + b"".join(bytes([c + 1, 0]) for c in range(4))
    out += b"\x00\x3f\x00"  # spectral selection 0..63, no successive approximation
    bits: list[int] = []

    def put(value: int, n: int) -> None:
        bits.extend((value >> (n - 1 - k)) & 1 for k in range(n))

    for block in range(((width + 7) // 8) * ((height + 7) // 8)):
        for c in range(4):
            diff = cmyk[c] - 128 if block == 0 else 0  # DC = level-shifted value / quantiser 8 * 8
            cat = abs(diff).bit_length()
            put(cat, 4)
            if cat:
                put(diff if diff >= 0 else diff + (1 << cat) - 1, cat)
            put(0, 1)  # end of block
    bits.extend([1] * (-len(bits) % 8))
    for k in range(0, len(bits), 8):
        byte = int("".join(map(str, bits[k : k + 8])), 2)
        out.append(byte)
        if byte == 0xFF:
            out.append(0)  # byte stuffing
    return bytes(out + b"\xff\xd9")


def with_exif_orientation(jpeg: bytes, orientation: int) -> bytes:
    """The same JPEG with an APP1 EXIF segment holding only an Orientation tag (6 = rotate 90 clockwise)."""
    ifd = struct.pack(">H", 1) + struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack(">I", 0)
    payload = b"Exif\x00\x00" + b"MM\x00*" + struct.pack(">I", 8) + ifd
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def exif_rotated_jpeg(good_jpeg: bytes) -> tuple[bytes, np.ndarray]:
    """A non-square JPEG tagged Orientation=6, and the RGB image a viewer shows (rotated 90 clockwise)."""
    bgr = cv2.imdecode(np.frombuffer(good_jpeg, np.uint8), cv2.IMREAD_COLOR)
    bgr = bgr[:, : max(16, bgr.shape[1] // 2)]
    raw = cv2.imencode(".jpg", bgr)[1].tobytes()
    stored = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR)
    shown = cv2.cvtColor(cv2.rotate(stored, cv2.ROTATE_90_CLOCKWISE), cv2.COLOR_BGR2RGB)
    return with_exif_orientation(raw, 6), shown


# Substrings of the ``error`` column for each corpus file that becomes an error row.
EXPECTED_ERRORS: dict[str, str] = {
    "zero-byte.jpg": "empty file",
    "truncated.jpg": "truncated JPEG",
    "random-bytes.jpg": "not an image",
    "text.png": "not an image",
    "tiny-1x1.png": "too small",
    "bomb-20000x20000.png": "cannot decode png",
}


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
        "cmyk.jpg": (cmyk_jpeg(), "ok"),
        "exif-rotated.jpg": (exif_rotated_jpeg(good_jpeg)[0], "ok"),
    }
    for name, (data, _) in files.items():
        (root / name).write_bytes(data)
    return {name: outcome for name, (_, outcome) in files.items()}


def write_symlinks(root: Path, outside: Path, good_jpeg: bytes) -> dict[str, str]:
    """Two links in an input folder: one to an image inside it, one to an image outside it.

    Returns:
        link name -> outcome: ``"ok"`` (listed and classified) or ``"skipped"``
        (not listed, a warning is logged).
    """
    root.mkdir(parents=True, exist_ok=True)
    outside.mkdir(parents=True, exist_ok=True)
    (root / "target.jpg").write_bytes(good_jpeg)
    (outside / "secret.jpg").write_bytes(good_jpeg)
    (root / "link-inside.jpg").symlink_to(root / "target.jpg")
    (root / "link-outside.jpg").symlink_to(outside / "secret.jpg")
    return {"target.jpg": "ok", "link-inside.jpg": "ok", "link-outside.jpg": "skipped"}


# S3 keys (under an input prefix) that look like path tricks; each is an
# ordinary object name to S3 and must be classified as such, and nothing
# written may be named from it.
TRICKY_S3_KEYS: tuple[str, ...] = ("../escape.jpg", "a/../../b.jpg", "ünïcode dir/cell with spaces.jpg")
