"""Images in chat requests: decode and validate in the router, before anything reaches an engine.

Each image becomes the bytes of a verified, fully decodable image of an allowed format and
size. Problems are 400s naming the image (``image 2``, counted across the request) and what
to fix. Remote ``http(s)`` URLs are fetched only from hosts the config allows, because a
server that fetches any URL a client names can be pointed at internal services.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import warnings
from urllib.parse import urlsplit

import httpx
from PIL import Image, UnidentifiedImageError

from deployments.config import ImageLimits
from deployments.errors import InvalidRequest

# Images smaller than this (their data URL) are checked on the event loop: a thread hop costs more.
OFF_LOOP_IMAGE_BYTES = 64 * 2**10


class ImageError(InvalidRequest):
    default_code = "invalid_image"


def _decode_data_url(url: str, index: int) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:") or not header.endswith(";base64"):
        raise ImageError(f"image {index}: expected a data URL like data:image/png;base64,<data>")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError(f"image {index}: the data URL's payload is not valid base64") from None


async def _fetch(url: str, index: int, limits: ImageLimits) -> bytes:
    host = urlsplit(url).hostname or ""
    if host not in limits.remote.allowed_hosts:
        raise ImageError(
            f"image {index}: remote image URLs are refused (host {host!r} is not in "
            "router.images.remote.allowed_hosts); send the image inline as a data: URL",
            code="remote_image_refused",
        )
    try:
        async with httpx.AsyncClient(timeout=limits.remote.fetch_timeout_s, follow_redirects=False) as client:
            async with client.stream("GET", url) as response:
                response.raise_for_status()
                data = bytearray()
                async for part in response.aiter_bytes():
                    data += part
                    if len(data) > limits.max_bytes:
                        raise ImageError(f"image {index}: larger than {limits.max_bytes} bytes")
                return bytes(data)
    except httpx.HTTPError as exc:
        raise ImageError(f"image {index}: fetching {url} failed: {type(exc).__name__}: {exc}") from None


def verify(data: bytes, index: int, limits: ImageLimits) -> bytes:
    """Check size, format, pixel count (before decoding: bombs) and full decodability."""
    if len(data) > limits.max_bytes:
        raise ImageError(f"image {index}: {len(data)} bytes exceeds the limit of {limits.max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                if image.format not in limits.formats:
                    raise ImageError(
                        f"image {index}: format {image.format} is not accepted; use one of {', '.join(limits.formats)}"
                    )
                width, height = image.size
                if width * height > limits.max_pixels:
                    raise ImageError(
                        f"image {index}: {width}x{height} pixels exceeds the limit of {limits.max_pixels} pixels"
                    )
                image.load()  # decode every byte: truncated or corrupt data fails here
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"image {index}: too many pixels (decompression bomb)") from None
    except UnidentifiedImageError:
        raise ImageError(f"image {index}: the data is not an image in any known format") from None
    except Exception as exc:  # Pillow raises many types for undecodable data
        raise ImageError(f"image {index}: not a decodable image ({type(exc).__name__}: {exc})") from None
    return data


def _verify_data_url(url: str, index: int, limits: ImageLimits) -> bytes:
    return verify(_decode_data_url(url, index), index, limits)


async def load_image(url: str, index: int, limits: ImageLimits) -> bytes:
    """The verified bytes of the image an ``image_url`` names (1-based ``index`` for messages).

    Decoding an image takes CPU time in proportion to its size (a 1 MB JPEG: ~18 ms of one core
    here, benchmarks/results/image_decode.json), so an image above ``OFF_LOOP_IMAGE_BYTES`` is
    decoded on a thread (Pillow releases the GIL while it decodes): the event loop keeps serving
    every other request meanwhile.
    """
    scheme = url.split(":", 1)[0].lower()
    if scheme == "data":
        if len(url) <= OFF_LOOP_IMAGE_BYTES:
            return _verify_data_url(url, index, limits)
        return await asyncio.to_thread(_verify_data_url, url, index, limits)
    if scheme in ("http", "https"):
        data = await _fetch(url, index, limits)
        return await asyncio.to_thread(verify, data, index, limits)
    raise ImageError(f"image {index}: unsupported URL scheme {scheme!r}; use a data: URL")


def open_rgb(data: bytes) -> Image.Image:
    """Verified bytes to the RGB image an engine consumes."""
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")
