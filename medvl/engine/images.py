"""Checking and decoding an uploaded image, the same way for the API and the CLI.

An image rejected by one is rejected by the other with the same message and status.
"""

from __future__ import annotations

import io

from PIL import Image


class BadInput(ValueError):
    """The client sent something unusable; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400, code: str = "bad_request"):
        super().__init__(message)
        self.status = status
        self.code = code


MAX_ASPECT_RATIO = 200


def decode_image(data: bytes, max_bytes: int, max_pixels: int) -> Image.Image:
    """Bytes -> RGB image, refusing empty, oversized, non-image, truncated and bomb inputs."""
    if not data:
        raise BadInput("the uploaded file is empty", 400, "empty_file")
    if len(data) > max_bytes:
        raise BadInput(f"the file is {len(data)} bytes; the limit is {max_bytes}", 413, "file_too_large")
    try:
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size
            if width * height > max_pixels:
                raise BadInput(f"the image is {width}x{height} = {width * height} pixels; the limit is "
                               f"{max_pixels}", 413, "image_too_large")
            if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
                # Qwen2-VL's resizer refuses aspect ratios above 200; say so instead of failing later.
                raise BadInput(f"the image is {width}x{height}; aspect ratios above {MAX_ASPECT_RATIO}:1 "
                               "cannot be processed", 400, "bad_image")
            probe.verify()
        with Image.open(io.BytesIO(data)) as img:
            img.seek(0)  # first frame of animated images
            img.load()
            return img.convert("RGB")
    except BadInput:
        raise
    except Image.DecompressionBombError as exc:
        raise BadInput(f"decompression bomb refused: {exc}", 413, "image_too_large") from None
    except Exception as exc:
        raise BadInput(f"not a readable image ({type(exc).__name__})", 400, "bad_image") from None
