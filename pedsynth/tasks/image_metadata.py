"""Image metadata policy: what ingest removes from an image before it is stored, and how.

With ``ingest.strip_metadata`` on (the default) nothing but pixels and what is needed to decode
them reaches the dataset:

- **JPEG** is rewritten at the marker level, losslessly: the entropy-coded scans, quantisation
  and Huffman tables are copied byte for byte, so the decoded pixels are identical. Dropped:
  APP1 (EXIF with GPS, XMP), APP3..APP13 and APP15 (maker notes, IPTC/Photoshop and the
  like), APP2 segments other than the ICC profile (FlashPix, MPF), COM comments, the JFIF
  thumbnail and JFXX extensions, and anything after the first image's EOI (the extra frames
  of MPO files). Kept: the JFIF density (APP0), the ICC colour profile (APP2 ``ICC_PROFILE``)
  and the Adobe segment (APP14), which tells a decoder whether the components are RGB or
  YCbCr and so changes the decoded colours when it is missing.
- **EXIF orientation** is applied before the tag goes: a JPEG whose orientation is not 1
  (upright) is turned upright and re-encoded once at ``ingest.jpeg_quality``, so it shows as
  its camera meant and training code that ignores EXIF (most does) sees the person upright.
  Stored width and height are the upright ones.
- **Other formats** (PNG, WebP, TIFF, ...) are converted once to RGB anyway; the converter
  writes no text, eXIf or XMP chunks, and orientation is applied first in the same way.
- **CMYK and YCCK JPEGs** are converted to RGB and re-encoded once, whatever
  ``strip_metadata`` says: many decoders and training loaders cannot read them.

With ``strip_metadata`` off, RGB and greyscale JPEG bytes are stored exactly as they were read
(EXIF orientation kept, not applied), as before the option existed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

_JFIF = b"JFIF\x00"
_ICC = b"ICC_PROFILE\x00"
_ADOBE = b"Adobe"
_SOS, _EOI, _COM, _APP0, _APP2, _APP14 = 0xDA, 0xD9, 0xFE, 0xE0, 0xE2, 0xEE
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM and RST0..7 carry no length


def _kept_segment(marker: int, payload: bytes) -> bytes | None:
    """The segment as stored (marker, length, payload), or None when it is dropped."""
    if marker == _APP0:
        if not payload.startswith(_JFIF) or len(payload) < 14:
            return None  # JFXX thumbnails and other APP0 uses
        payload = payload[:12] + b"\x00\x00"  # density kept, thumbnail (size and pixels) dropped
    elif marker == _APP2:
        if not payload.startswith(_ICC):
            return None
    elif marker == _APP14:
        if not payload.startswith(_ADOBE):
            return None
    elif 0xE1 <= marker <= 0xEF or marker == _COM:
        return None
    return bytes((0xFF, marker)) + (len(payload) + 2).to_bytes(2, "big") + payload


def _scan_end(data: bytes, start: int) -> int | None:
    """Index of the marker that ends the entropy-coded data starting at ``start``."""
    at = start
    while True:
        ff = data.find(b"\xff", at)
        if ff < 0 or ff + 1 >= len(data):
            return None
        following = data[ff + 1]
        if following == 0 or 0xD0 <= following <= 0xD7:  # a stuffed 0xFF, a restart marker
            at = ff + 2
            continue
        return ff


def strip_jpeg(data: bytes) -> bytes | None:
    """``data`` without its metadata segments, pixels untouched; None if it cannot be parsed.

    The input is returned itself when nothing had to go. None means the marker stream is not
    one this parser follows (the caller then re-encodes from decoded pixels rather than keep
    metadata it could not remove).
    """
    if not data.startswith(b"\xff\xd8"):
        return None
    out = bytearray(b"\xff\xd8")
    at, n = 2, len(data)
    while at < n:
        if data[at] != 0xFF:
            return None
        while at < n and data[at] == 0xFF:  # fill bytes before a marker
            at += 1
        if at >= n:
            return None
        marker = data[at]
        at += 1
        if marker == _EOI:
            out += b"\xff\xd9"
            return data if len(out) == n else bytes(out)
        if marker in _STANDALONE:
            out += bytes((0xFF, marker))
            continue
        if at + 2 > n:
            return None
        length = int.from_bytes(data[at : at + 2], "big")
        if length < 2 or at + length > n:
            return None
        segment = _kept_segment(marker, data[at + 2 : at + length])
        at += length
        if segment is not None:
            out += segment
        if marker == _SOS:
            end = _scan_end(data, at)
            if end is None:
                return None
            out += data[at:end]
            at = end
    return None


def orientation(exif: Mapping[int, Any]) -> int:
    """The EXIF orientation (1..8; 1 = upright), 1 when absent or not a valid value."""
    value = exif.get(0x0112, 1)
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def policy_note(ingest: Mapping[str, Any]) -> str:
    """A few sentences for the dataset card saying what ingest did to image metadata.

    Empty for a manifest whose ingest settings do not record the policy (made before it
    existed), rather than a guess.
    """
    if "strip_metadata" not in ingest:
        return ""
    quality = ingest.get("jpeg_quality", 95)
    cmyk = f"CMYK and YCCK JPEGs were converted to RGB (re-encoded once at quality {quality})."
    if not ingest.get("strip_metadata", True):
        return (
            "Image metadata: kept (`ingest.strip_metadata: false`); RGB and greyscale JPEGs "
            f"are stored byte for byte, EXIF (including any GPS position) included. {cmyk}"
        )
    return (
        "Image metadata: stripped (`ingest.strip_metadata: true`). EXIF (including GPS), XMP, "
        "IPTC, comments and thumbnails were removed from JPEGs losslessly (same pixels; the "
        "ICC colour profile is kept), and converted images carry no text or EXIF chunks. "
        f"Images with an EXIF orientation other than upright were turned upright and "
        f"re-encoded once at quality {quality}. {cmyk}"
    )
