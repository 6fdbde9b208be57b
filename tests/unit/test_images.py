"""Image decoding and validation (no Ray): the router's guard in front of the engines."""

import asyncio
import base64
import io
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from deployments.config import ImageLimits
from deployments.images import ImageError, load_image, open_rgb


def png(size: tuple[int, int] = (8, 8), fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, "green").save(buffer, fmt)
    return buffer.getvalue()


DEFAULT_LIMITS = ImageLimits()


def load(url: str, limits: ImageLimits = DEFAULT_LIMITS) -> bytes:
    return asyncio.run(load_image(url, 3, limits))


def test_a_data_url_decodes_to_verified_bytes() -> None:
    data = png()
    assert load("data:image/png;base64," + base64.b64encode(data).decode()) == data
    assert open_rgb(data).size == (8, 8)


def test_jpeg_and_webp_are_accepted() -> None:
    for fmt in ("JPEG", "WEBP"):
        assert load("data:image/x;base64," + base64.b64encode(png(fmt=fmt)).decode())


@pytest.mark.parametrize(
    ("limits", "data", "fragment"),
    [
        (ImageLimits(max_bytes=100), png((64, 64)), r"\d+ bytes exceeds the limit of 100"),
        (ImageLimits(max_pixels=63), png((8, 8)), "8x8 pixels exceeds the limit of 63 pixels"),
        (ImageLimits(formats=["PNG"]), png(fmt="GIF"), "format GIF is not accepted; use one of PNG"),
    ],
)
def test_limits_are_configurable(limits: ImageLimits, data: bytes, fragment: str) -> None:
    with pytest.raises(ImageError, match="image 3: " + fragment):
        load("data:image/png;base64," + base64.b64encode(data).decode(), limits)


@pytest.fixture
def image_server() -> Iterator[str]:
    body = png()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            payload = body * 50 if self.path == "/big.png" else body
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_remote_urls_are_refused_unless_the_host_is_allowed(image_server: str) -> None:
    with pytest.raises(ImageError, match="remote image URLs are refused") as info:
        load(f"{image_server}/cat.png")
    assert info.value.code == "remote_image_refused"
    allowed = ImageLimits(remote={"allowed_hosts": ["127.0.0.1"]})
    assert load(f"{image_server}/cat.png", allowed) == png()
    capped = ImageLimits(max_bytes=len(png()) * 10, remote={"allowed_hosts": ["127.0.0.1"]})
    with pytest.raises(ImageError, match="larger than"):
        load(f"{image_server}/big.png", capped)


def test_an_unreachable_allowed_host_is_a_clear_error() -> None:
    limits = ImageLimits(remote={"allowed_hosts": ["127.0.0.1"], "fetch_timeout_s": 1})
    with pytest.raises(ImageError, match=re.escape("image 3: fetching http://127.0.0.1:9/x.png failed")):
        load("http://127.0.0.1:9/x.png", limits)
