"""Image decoding for the embed job: bytes in, a 224x224 RGB array or a precise rejection reason out.

Kept free of Spark and TensorFlow so that it can be tested and benchmarked on its own.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

INPUT_SIZE = (224, 224)
# Extensions we treat as images (case-insensitive). Anything else in a batch is rejected, not skipped,
# so that embedded + rejected always equals the files seen.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
ACCEPTED_FORMATS = {"JPEG", "PNG"}
# Pixels we agree to hold in memory after JPEG draft-mode reduction (about 150 MB as RGB).
MAX_DECODED_PIXELS = 50_000_000


class RejectedImage(Exception):
    """An input file that cannot be embedded; str(exc) is the reason stored in the rejects table."""


def _flatten_alpha(im: Image.Image) -> Image.Image:
    # Fruits-360 and most product photos sit on white: transparent pixels become white, not black.
    rgba = im.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
        return _flatten_alpha(im)
    if mode.startswith("I;16") or mode in ("I", "F"):
        # 16-bit and 32-bit greyscale: scale to 8 bits instead of clipping (PIL's convert clips to 255).
        arr = np.asarray(im, dtype=np.float64)
        peak = 65535.0 if mode.startswith("I;16") else max(float(arr.max()), 1.0)
        arr8 = np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    return im.convert("RGB")  # L, 1, P, CMYK, YCbCr


def decode_rgb224(data: bytes) -> np.ndarray:
    """Decode an encoded image to a (224, 224, 3) uint8 RGB array.

    Raises RejectedImage with a reason a person can act on. Large JPEGs are decoded at a reduced DCT
    scale (draft mode), so a 10,000 x 10,000 photo costs about 1/64 of its full-size memory.
    """
    if not data:
        raise RejectedImage("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Pillow warns from 89 M px on the declared size, before draft mode can shrink a JPEG; our own
            # cap below applies to what is really decoded. Its hard error (> 179 M px) still rejects.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                if im.format not in ACCEPTED_FORMATS:
                    raise RejectedImage(f"unsupported image format {im.format} (accepted: JPEG, PNG)")
                if im.format == "JPEG":
                    im.draft("RGB", INPUT_SIZE)
                width, height = im.size
                if width * height > MAX_DECODED_PIXELS:
                    raise RejectedImage(
                        f"image too large: {width}x{height} px to decode exceeds the limit of "
                        f"{MAX_DECODED_PIXELS:,} px (JPEGs are reduced first; this one cannot be)"
                    )
                im.load()
                oriented = ImageOps.exif_transpose(im)
                rgb = _to_rgb(oriented)
                resized = rgb.resize(INPUT_SIZE, Image.Resampling.BILINEAR)
                return np.asarray(resized, dtype=np.uint8)
    except RejectedImage:
        raise
    except UnidentifiedImageError:
        raise RejectedImage("not a decodable image: content is not JPEG or PNG") from None
    except Image.DecompressionBombError as exc:
        raise RejectedImage(f"image too large (decompression bomb guard): {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise RejectedImage(f"corrupt or truncated image: {exc}") from None


def preprocess(batch_uint8: np.ndarray) -> np.ndarray:
    """MobileNetV2's preprocess_input (pixels to [-1, 1]) without importing TensorFlow."""
    return batch_uint8.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def has_image_extension(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)
