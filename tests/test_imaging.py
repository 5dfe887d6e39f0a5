"""Decoder behaviour on hostile files. Real: Pillow on real photo bytes. No Spark, no S3: the same
function runs inside the embed job's UDF, and tests/test_hostile_batch.py checks it there end to end."""

from __future__ import annotations

import numpy as np
import pytest
from fruits_jobs import imaging
from hostile import hostile_files

pytestmark = pytest.mark.fast  # no Spark, no DAG run (`make test-fast`)

CASES = hostile_files()


@pytest.mark.parametrize("name", sorted(CASES))
def test_decode_or_reject_with_reason(name: str) -> None:
    data, reason = CASES[name]
    is_image_name = reason is None or "extension" not in reason
    assert imaging.has_image_extension(name) == is_image_name
    if not is_image_name:
        return  # the job rejects these by name, before decoding (see test_hostile_batch.py)
    if reason is None:
        pixels = imaging.decode_rgb224(data)
        assert pixels.shape == (224, 224, 3) and pixels.dtype == np.uint8
        assert 20 < pixels.mean() < 250  # real content, not a black or white frame
    else:
        with pytest.raises(imaging.RejectedImage, match=reason):
            imaging.decode_rgb224(data)


def test_modes_convert_to_the_same_picture() -> None:
    """Transparency, palettes, CMYK and 16-bit are converted, not garbled: same photo, close pixels."""
    ref = imaging.decode_rgb224(CASES["png-named.jpg"][0]).astype(float)
    for name in ("rgba.png", "palette.png", "cmyk.jpg"):
        diff = np.abs(imaging.decode_rgb224(CASES[name][0]).astype(float) - ref).mean()
        assert diff < 12, (name, diff)
    grey = imaging.decode_rgb224(CASES["grey.jpg"][0]).astype(float)
    grey16 = imaging.decode_rgb224(CASES["grey16.png"][0]).astype(float)
    assert np.abs(grey - grey16).mean() < 3  # 16-bit scaled to 8 bits, not clipped to white


def test_transparent_pixels_become_white() -> None:
    from PIL import Image

    im = Image.new("RGBA", (50, 50), (255, 0, 0, 0))
    import io

    buf = io.BytesIO()
    im.save(buf, "PNG")
    assert imaging.decode_rgb224(buf.getvalue()).min() == 255


def test_preprocess_matches_mobilenet_scaling() -> None:
    x = np.array([[[[0, 127, 255]]]], dtype=np.uint8)
    np.testing.assert_allclose(imaging.preprocess(x).ravel(), [-1.0, -0.0039216, 1.0], atol=1e-6)


def test_exif_orientation_is_applied() -> None:
    """A phone photo stored sideways with EXIF Orientation=6 (rotate 90 degrees clockwise to display) is
    embedded as it is displayed: what is stored on the left ends on top."""
    import io

    from PIL import Image

    stored = Image.new("RGB", (200, 100), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 100, 100))  # left half red, right half blue, as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    buf = io.BytesIO()
    stored.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    pixels = imaging.decode_rgb224(buf.getvalue()).astype(int)
    top, bottom = pixels[:100].reshape(-1, 3).mean(axis=0), pixels[124:].reshape(-1, 3).mean(axis=0)
    assert top[0] > 200 and top[2] < 50, top  # red on top
    assert bottom[2] > 200 and bottom[0] < 50, bottom  # blue below
