"""Hostile input files, made for real with Pillow from a real Fruits-360 photo."""

from __future__ import annotations

import io

import numpy as np
from conftest import SAMPLE
from PIL import Image


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def hostile_files() -> dict[str, tuple[bytes, str | None]]:
    """{name: (bytes, None if it must be embedded else a fragment of the expected reject reason)}."""
    photo = Image.open(sorted((SAMPLE / "Training" / "Banana").iterdir())[0]).convert("RGB")
    jpeg = _encode(photo, "JPEG", quality=95)
    big = Image.new("RGB", (10_000, 10_000), (200, 30, 30))
    grey16 = Image.fromarray(np.asarray(photo.convert("L"), dtype=np.uint16) * 257)
    return {
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated"),
        "empty.jpg": (b"", "empty file"),
        "text.jpg": (b"this is not a photo\n", "not a decodable image"),
        "gif-named.png": (_encode(photo, "GIF"), "unsupported image format GIF"),
        "png-named.jpg": (_encode(photo, "PNG"), None),
        "rgba.png": (_encode(photo.convert("RGBA"), "PNG"), None),
        "palette.png": (_encode(photo.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"), None),
        "grey.jpg": (_encode(photo.convert("L"), "JPEG"), None),
        "cmyk.jpg": (_encode(photo.convert("CMYK"), "JPEG"), None),
        "grey16.png": (_encode(grey16, "PNG"), None),
        "huge-10000px.jpg": (_encode(big, "JPEG", quality=80), None),
        "huge-10000px.png": (_encode(big, "PNG"), "image too large"),
        "upper.JPG": (jpeg, None),
        "long.jpeg": (jpeg, None),
        "notes.txt": (b"uploaded by mistake", "unsupported extension"),
        "photo.webp": (_encode(photo, "WEBP"), "unsupported extension"),
    }
