"""img2dataset's resizer with stricter checks; img2dataset runs it in its worker processes (download.py).

img2dataset reports every payload OpenCV cannot decode as "Image decoding error",
and OpenCV fills some truncated JPEGs with grey instead of failing. Before
handing a payload to img2dataset's own resizer, :class:`CheckingResizer` checks

* the byte size (``max_image_bytes``) -> "image too large: ..."
* whether PIL recognises an image at all -> "not an image: ..."
* the pixel count from the header, before decoding (so a decompression bomb is
  never decoded) -> "image area too large: ..."
* a full decode -> "decode error: ... truncated ..." for cut-off files

so the quarantine can say ``too_large``, ``not_an_image``, ``truncated_image`` or
``decode_error`` (download.reason_for). It lives in its own module so that
importing the collect stage does not import img2dataset (seconds per process).
"""

from __future__ import annotations

import io

from img2dataset.resizer import Resizer


class CheckingResizer(Resizer):
    """img2dataset's Resizer, preceded by byte-size, format, pixel-count and full-decode checks."""

    def __init__(self, *args, max_image_bytes: int, verify_images: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_image_bytes = max_image_bytes
        self.verify_images = verify_images

    def __call__(self, img_stream, blurring_bbox_list=None):
        """Same contract as img2dataset's: (img_str, width, height, original_width, original_height, error)."""
        failed = (None, None, None, None, None)
        img_stream.seek(0)
        data = img_stream.read()
        img_stream.seek(0)
        if len(data) > self.max_image_bytes:
            return *failed, f"image too large: {len(data)} bytes > max_image_bytes={self.max_image_bytes}"
        if self.verify_images:
            error = self.check_payload(data)
            if error is not None:
                return *failed, error
        return super().__call__(img_stream, blurring_bbox_list)

    def check_payload(self, data: bytes) -> str | None:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size
                if width * height > self.max_image_area:
                    return f"image area too large: {width}x{height} > max_image_pixels={self.max_image_area:.0f}"
                im.load()
        except UnidentifiedImageError:
            return f"not an image: {len(data)} bytes starting {data[:24]!r}"
        except Image.DecompressionBombError as exc:
            return f"image area too large: {exc}"
        except Exception as exc:  # noqa: BLE001  (a decoder failure is data, never a crash: STYLE.md 5)
            return f"decode error: {type(exc).__name__}: {exc}"
        return None
