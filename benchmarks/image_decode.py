"""``python -m benchmarks.image_decode``: CPU time to check one image as the router does, by size.

``images.load_image`` decodes base64 and every pixel before a request reaches an engine. This
measures that work per image (CPU time of the calling thread, median of repeats) for JPEGs of
about 0.06, 1 and 2 MB and for the small PNGs the benchmarks send, and writes
``results/image_decode.json``: the numbers behind ``images.OFF_LOOP_IMAGE_BYTES``.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image

from deployments.config import ImageLimits
from deployments.images import OFF_LOOP_IMAGE_BYTES, _verify_data_url, load_image

RESULTS = Path(__file__).parent / "results" / "image_decode.json"
REPEATS = 20


def jpeg(side: int, quality: int = 90) -> bytes:
    """A photo-like JPEG: smooth gradients plus noise, so its size grows with its pixels as a photo's does."""
    rng = np.random.default_rng(side)
    y, x = np.mgrid[0:side, 0:side] / side
    base = np.stack([x * 255, y * 255, (x + y) * 127], axis=-1)
    pixels = np.clip(base + rng.normal(0, 24, base.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def cpu_ms(url: str, limits: ImageLimits) -> float:
    times = []
    for _ in range(REPEATS):
        started = time.thread_time()
        _verify_data_url(url, 1, limits)
        times.append((time.thread_time() - started) * 1e3)
    return round(statistics.median(times), 3)


def loop_blocked_ms(url: str, limits: ImageLimits, on_loop: bool = False) -> float:
    """The event loop's longest stall while ``load_image`` checks the image (what other requests
    wait); ``on_loop``: while the check runs on the loop itself, as it did before."""

    async def measure() -> float:
        worst, stop = 0.0, asyncio.Event()

        async def ticker() -> None:
            nonlocal worst
            last = time.perf_counter()
            while not stop.is_set():
                await asyncio.sleep(0)
                now = time.perf_counter()
                worst, last = max(worst, now - last), now

        task = asyncio.create_task(ticker())
        await asyncio.sleep(0)
        if on_loop:
            _verify_data_url(url, 1, limits)
        else:
            await load_image(url, 1, limits)
        stop.set()
        await task
        return worst * 1e3

    return round(statistics.median(asyncio.run(measure()) for _ in range(5)), 3)


def main() -> None:
    limits = ImageLimits()
    images = {f"jpeg {side}x{side}": jpeg(side) for side in (320, 1448, 2048)}
    buffer = io.BytesIO()
    Image.new("RGB", (96, 96), "red").save(buffer, "PNG")
    images["png 96x96 (benchmarks)"] = buffer.getvalue()
    rows = {}
    for name, data in images.items():
        url = "data:image/jpeg;base64," + base64.b64encode(data).decode()
        rows[name] = {
            "bytes": len(data),
            "cpu_ms": cpu_ms(url, limits),
            "off_loop": len(url) > OFF_LOOP_IMAGE_BYTES,
            "event_loop_stall_ms": loop_blocked_ms(url, limits),
            "event_loop_stall_if_checked_on_the_loop_ms": loop_blocked_ms(url, limits, on_loop=True),
        }
        print(name, rows[name])
    RESULTS.write_text(json.dumps({"images": rows, "off_loop_above_bytes": OFF_LOOP_IMAGE_BYTES}, indent=2) + "\n")


if __name__ == "__main__":
    main()
