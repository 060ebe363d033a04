"""Image checks: does a file or a byte string hold an image pedsynth can store, and as what.

Shared by :func:`pedsynth.tasks.ingest.load_images` (files on disk) and
:func:`pedsynth.tasks.ingest.verify_pairs` (bytes from existing shards). Limits come from the
header before any pixel is decoded; then the image is decoded in full, with Pillow's
``LOAD_TRUNCATED_IMAGES`` held off, because ``verify()`` alone misses truncation. JPEGs keep
their compressed pixels byte for byte (metadata stripped losslessly unless
``ingest.strip_metadata`` is off; see :mod:`pedsynth.tasks.image_metadata`); CMYK JPEGs,
JPEGs to turn upright and anything else are converted once to RGB in the configured format.
"""

from __future__ import annotations

import io
import os
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from pedsynth.schemas.config import IngestConfig
from pedsynth.tasks.image_metadata import orientation, strip_jpeg
from pedsynth.tasks.ingest_rejects import SHOWN_CHARS, Rejection

_JPEG_FORMATS = frozenset({"JPEG", "MPO"})  # MPO: camera JPEGs with extra frames appended


class CheckedImage(NamedTuple):
    """An image that passed :func:`check_image`, as it will be stored."""

    width: int
    height: int
    data: bytes  # JPEG: the input's scans untouched (metadata stripped); others: converted once
    path: str  # the input name, with the extension of the stored format


def _with_suffix(name: str, suffix: str) -> str:
    stem, dot, ext = name.rpartition(".")
    return stem + suffix if dot and "/" not in ext else name + suffix


class _StrictDecoding:
    """Holds ``ImageFile.LOAD_TRUNCATED_IMAGES`` at False while any check runs.

    The flag is a module global of Pillow; a counter under a lock makes nested and concurrent
    (threaded) checks safe, and the caller's value comes back when the last check ends.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._depth = 0
        self._saved = False

    @contextmanager
    def __call__(self) -> Iterator[None]:
        with self._lock:
            if self._depth == 0:
                self._saved = ImageFile.LOAD_TRUNCATED_IMAGES
                ImageFile.LOAD_TRUNCATED_IMAGES = False
            self._depth += 1
        try:
            yield
        finally:
            with self._lock:
                self._depth -= 1
                if self._depth == 0:
                    ImageFile.LOAD_TRUNCATED_IMAGES = self._saved


_strict_decoding = _StrictDecoding()


def check_image(data: bytes, name: str, cfg: IngestConfig) -> CheckedImage | Rejection:
    """Verify one image's bytes and give what to store, or why it is rejected.

    Size limits are checked from the header before anything is decoded, then the image is
    decoded in full (``verify()`` misses truncation). JPEG scans are kept as they are (metadata
    stripped losslessly when ``cfg.strip_metadata``); other formats, CMYK JPEGs and JPEGs to
    turn upright are converted once to RGB ``cfg.convert_format``. ``name`` is the image's path
    as the source names it; the stored path gets the stored format's extension.
    """
    if not data:
        return Rejection("empty_file", f"{name}: 0 bytes")
    if len(data) > cfg.max_image_bytes:
        return Rejection(
            "too_large", f"{name}: {len(data)} bytes > max_image_bytes {cfg.max_image_bytes}"
        )
    with _strict_decoding():
        try:
            with Image.open(io.BytesIO(data)) as img:
                problem = _check_size(img.size, name, cfg)
                if problem is not None:
                    return problem
                img.load()
                return _stored(img, data, name, cfg)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            return Rejection("too_large", f"{name}: {exc}")
        except UnidentifiedImageError:
            return Rejection("undecodable", f"{name}: not an image file Pillow can identify")
        except Exception as exc:  # any decoder failure is a property of the data
            return _decode_failure(exc, name)


def _check_size(size: tuple[int, int], name: str, cfg: IngestConfig) -> Rejection | None:
    width, height = size
    if width * height > cfg.max_pixels:
        detail = f"{name}: {width}x{height} = {width * height} pixels > max_pixels {cfg.max_pixels}"
        return Rejection("too_large", detail)
    if min(width, height) < cfg.min_side:
        return Rejection("too_small", f"{name}: {width}x{height}, a side < min_side {cfg.min_side}")
    return None


def _decode_failure(exc: Exception, name: str) -> Rejection:
    message = str(exc)
    lowered = message.lower()
    reason = (
        "truncated" if "truncated" in lowered or "broken data stream" in lowered else "undecodable"
    )
    detail = f"{name}: {type(exc).__name__}: {message}"
    return Rejection(reason, detail[: SHOWN_CHARS * 2])


def _stored(img: Image.Image, data: bytes, name: str, cfg: IngestConfig) -> CheckedImage:
    """What to store for a decoded image: JPEG scans as they are, anything else converted once.

    The metadata policy is :mod:`pedsynth.tasks.image_metadata`'s.
    """
    is_jpeg = img.format in _JPEG_FORMATS
    jpeg_name = name if name.lower().endswith((".jpg", ".jpeg")) else _with_suffix(name, ".jpg")
    if is_jpeg and img.mode in ("RGB", "L"):
        if not cfg.strip_metadata:
            return CheckedImage(img.width, img.height, data, jpeg_name)
        stripped = strip_jpeg(data) if _orientation(img) == 1 else None
        if stripped is not None:
            return CheckedImage(img.width, img.height, stripped, jpeg_name)
        # to turn upright, or a marker stream the stripper does not follow: re-encoded once
    # Pillow copies a JPEG comment from the source unless told otherwise
    kept = {"exif": b"", "comment": b""} if cfg.strip_metadata else {"exif": img.info.get("exif")}
    if cfg.strip_metadata and _orientation(img) != 1:
        img = ImageOps.exif_transpose(img)
    out = io.BytesIO()
    if is_jpeg or cfg.convert_format == "jpeg":  # a JPEG stays a JPEG (CMYK/YCCK, upright)
        _to_rgb(img).save(out, "JPEG", quality=cfg.jpeg_quality, **kept)
        stored_name = jpeg_name if is_jpeg else _with_suffix(name, ".jpg")
    else:
        _to_rgb(img).save(out, "PNG")
        stored_name = _with_suffix(name, ".png")
    return CheckedImage(img.width, img.height, out.getvalue(), stored_name)


def _orientation(img: Image.Image) -> int:
    """The image's EXIF orientation; 1 (upright) when its EXIF is absent or does not parse."""
    try:
        return orientation(img.getexif())
    except Exception:  # a damaged EXIF block is metadata to drop, not a reason to reject
        return 1


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB for any Pillow mode: alpha on white, 16/32-bit and float scaled to 8 bits."""
    if img.mode == "RGB" and "transparency" not in img.info:
        return img
    if img.mode.startswith(("I", "F")):
        return Image.fromarray(_to_uint8(np.asarray(img)), mode="L").convert("RGB")
    if "A" in img.mode or "a" in img.mode or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        white.alpha_composite(rgba)
        return white.convert("RGB")
    return img.convert("RGB")


def _to_uint8(pixels: np.ndarray) -> np.ndarray:
    """8-bit grey levels for 16-bit, 32-bit or float pixels."""
    if pixels.dtype.kind == "u" and pixels.dtype.itemsize == 2:  # I;16 and variants
        return (pixels.astype(np.uint32) >> 8).astype(np.uint8)
    values = pixels.astype(np.float64)
    low, high = float(values.min()), float(values.max())
    if low >= 0 and high <= 255:
        return values.astype(np.uint8)
    if high <= low:
        return np.zeros(values.shape, np.uint8)
    return ((values - low) * (255.0 / (high - low))).round().astype(np.uint8)


def read_image_file(path: str, name: str, cfg: IngestConfig) -> CheckedImage | Rejection:
    """:func:`check_image` for a file; its size is checked before it is read."""
    try:
        info = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return Rejection("missing_file", f"{path}: no such file")
    except OSError as exc:
        return Rejection("unreadable_file", f"{path}: {exc.strerror or exc}")
    if not stat.S_ISREG(info.st_mode):
        return Rejection("missing_file", f"{path}: not a regular file")
    if info.st_size == 0:
        return Rejection("empty_file", f"{path}: 0 bytes")
    if info.st_size > cfg.max_image_bytes:
        detail = f"{path}: {info.st_size} bytes > max_image_bytes {cfg.max_image_bytes}"
        return Rejection("too_large", detail)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return Rejection("unreadable_file", f"{path}: {exc.strerror or exc}")
    return check_image(data, name, cfg)
