"""The vision path through the real stack: HTTP -> router (Pillow) -> Serve handle -> vLLM."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from typing import Any

import openai
import pytest
from PIL import Image
from ray import serve

from tests.e2e.conftest import APP_NAME, ServeApp, chat, poll

pytestmark = pytest.mark.e2e


def png(color: Any, size: tuple[int, int] = (48, 40), fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, fmt)
    return buffer.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def vision_messages(*images: str, text: str = "What is in this image?") -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}]
    parts += [{"type": "image_url", "image_url": {"url": url}} for url in images]
    return [{"role": "user", "content": parts}]


def greedy(client: openai.OpenAI, *images: str, model: str = "vision", max_tokens: int = 16) -> str:
    response = client.chat.completions.create(
        model=model,
        messages=vision_messages(*images),
        max_tokens=max_tokens,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    return response.choices[0].message.content


RED, BLUE = data_url(png("red")), data_url(png("blue"))


def test_image_chat_non_streaming_and_streaming_agree(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(
        model="vision", messages=vision_messages(RED), max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    assert whole.usage.completion_tokens == 12
    assert whole.usage.prompt_tokens > 4  # the image's tokens are in the prompt
    chunks = list(
        client.chat.completions.create(
            model="vision",
            messages=vision_messages(RED),
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_the_image_changes_the_output(client: openai.OpenAI) -> None:
    assert greedy(client, RED) == greedy(client, RED)  # deterministic
    assert greedy(client, RED) != greedy(client, BLUE)


def test_two_images_in_one_message(client: openai.OpenAI) -> None:
    one = client.chat.completions.create(model="vision", messages=vision_messages(RED), max_tokens=4, temperature=0)
    two = client.chat.completions.create(
        model="vision", messages=vision_messages(RED, BLUE), max_tokens=4, temperature=0
    )
    assert two.usage.prompt_tokens > one.usage.prompt_tokens  # both images' tokens are in the prompt
    assert greedy(client, RED, BLUE) != greedy(client, BLUE, RED)  # order matters: both were seen


def test_a_vision_model_serves_text_only_requests(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model="vision", messages=[{"role": "user", "content": "hello"}], max_tokens=5, extra_body={"ignore_eos": True}
    )
    assert response.usage.completion_tokens == 5


def test_greedy_output_matches_hf_transformers(app: ServeApp, client: openai.OpenAI) -> None:
    """The same checkpoint, prompt and image through HF transformers gives the same tokens."""
    import torch
    from transformers import AutoProcessor, Idefics3ForConditionalGeneration

    path = app.models_dir / "tiny-idefics3"
    processor = AutoProcessor.from_pretrained(path)
    model = Idefics3ForConditionalGeneration.from_pretrained(path).eval()
    for color in ("red", (20, 200, 90)):
        image = png(color)
        messages = [
            {"role": "user", "content": [{"type": "text", "text": "What is in this image?"}, {"type": "image"}]}
        ]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(text=prompt, images=[Image.open(io.BytesIO(image)).convert("RGB")], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=16, do_sample=False, min_new_tokens=16)
        expected = processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        served = greedy(client, data_url(image))
        assert served.split() == expected.split()


def tiff() -> bytes:
    return png("red", fmt="TIFF")


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A tiny PNG whose header claims 400 megapixels (its data is never reached)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


BAD_IMAGES = {
    "bad base64": ("data:image/png;base64,***not-base64***", "not valid base64"),
    "not an image": (data_url(b"hello, I am text"), "not an image in any known format"),
    "unsupported format": (data_url(tiff(), "image/tiff"), "format TIFF is not accepted"),
    "truncated": (data_url(png("red")[:60]), "not a decodable image"),
    "decompression bomb": (data_url(bomb_png()), "too many pixels (decompression bomb)"),
    "over the pixel limit": (data_url(bomb_png(5000, 4000)), "5000x4000 pixels exceeds the limit of 16777216"),
    "too many bytes": (data_url(b"\0" * (11 * 2**20)), "exceeds the limit of"),
    "not a data url": ("data:image/png,rawbytes", "expected a data URL"),
    "unsupported scheme": ("ftp://example.com/cat.png", "unsupported URL scheme 'ftp'"),
    "remote url": ("https://example.com/cat.png", "remote image URLs are refused"),
}


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
def test_bad_images_are_400_naming_the_image_and_the_problem(app: ServeApp, case: str) -> None:
    url, fragment = BAD_IMAGES[case]
    body = chat("vision", messages=vision_messages(RED, url), max_tokens=4)
    response = app.http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["message"].startswith("image 2:"), error
    assert fragment in error["message"], error
    if case == "remote url":
        assert error["code"] == "remote_image_refused"


def test_the_replica_is_unharmed_after_the_bad_image_corpus(client: openai.OpenAI) -> None:
    for url, _ in BAD_IMAGES.values():
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="vision", messages=vision_messages(url), max_tokens=2)
    assert greedy(client, RED, max_tokens=4)


def test_too_many_images(app: ServeApp) -> None:
    response = app.http.post("/v1/chat/completions", json=chat("vision", messages=vision_messages(*[RED] * 5)))
    assert response.status_code == 400
    assert "5 images exceed the limit of 4" in response.json()["error"]["message"]


def test_cancellation_mid_stream_aborts_the_request_in_vllm(app: ServeApp) -> None:
    body = chat("vision", messages=vision_messages(RED), stream=True, max_tokens=30000, ignore_eos=True)
    with app.http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        lines = response.iter_lines()  # held: dropping the iterator would close the connection
        next(line for line in lines if '"content"' in line)
        assert app.active_generations("vision") == 1  # vLLM's own count of unfinished requests
    stopped_in = poll(lambda: app.active_generations("vision") == 0, 5, "vLLM to drop the request")
    assert stopped_in < 1
    assert greedy(app.openai, RED, max_tokens=4)


def test_chunk_deadline_ends_a_vision_stream_with_the_sse_error_event(app: ServeApp) -> None:
    body = chat(
        "vision", messages=vision_messages(RED), stream=True, max_tokens=30000, ignore_eos=True, chunk_timeout_s=0.0005
    )
    with app.http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2].removeprefix("data: "))["error"]["code"] == "chunk_timeout"
    assert poll(lambda: app.active_generations("vision") == 0, 5, "vLLM to drop the request") < 1


def test_handle_api_infer_vision(app: ServeApp) -> None:
    router = serve.get_app_handle(APP_NAME)
    completion = router.infer_vision.remote(chat("vision", messages=vision_messages(RED), max_tokens=4)).result()
    assert completion["usage"]["completion_tokens"] <= 4
    chunks = list(
        router.options(stream=True).infer_vision_stream.remote(
            chat("vision", messages=vision_messages(RED), max_tokens=4, temperature=0)
        )
    )
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    from deployments.errors import InvalidRequest

    with pytest.raises(InvalidRequest, match="at least one image"):
        router.infer_vision.remote(chat("vision")).result()
    with pytest.raises(InvalidRequest, match="does not accept images"):
        router.infer_vision.remote(chat("tiny", messages=vision_messages(RED))).result()


def test_isq_fp8_quantizes_the_linear_layers_on_cpu(app: ServeApp, client: openai.OpenAI) -> None:
    card = app.model_card("vision-fp8")
    assert card["quantization"] == "fp8_per_channel"
    assert app.model_card("vision")["quantization"] is None
    quantized = serve.get_deployment_handle("model-vision-fp8", APP_NAME).layer_types.remote().result()
    plain = serve.get_deployment_handle("model-vision", APP_NAME).layer_types.remote().result()
    fp8 = {name: n for name, n in quantized.items() if "Fp8" in name}
    assert sum(fp8.values()) >= 14, quantized  # every linear of the vision tower and the text model
    assert not any("Fp8" in name for name in plain), plain
    assert greedy(client, RED, model="vision-fp8", max_tokens=4)


def test_gguf_layer_types_come_from_the_file(app: ServeApp) -> None:
    types = serve.get_deployment_handle("model-tiny", APP_NAME).layer_types.remote().result()
    assert types.get("Q4_K", 0) > 0 and types.get("F32", 0) > 0, types


def test_vision_model_unload_and_load(app: ServeApp, client: openai.OpenAI) -> None:
    from deployments.lifecycle import set_model_loaded

    set_model_loaded("vision-fp8", False)
    try:
        # Every replica has said so; the card may lag while Serve still lists the deployment as
        # updating and a replica busy with the unload misses the router's info deadline.
        poll(lambda: app.model_card("vision-fp8")["status"] == "unloaded", 60, "the card to say unloaded")
        with pytest.raises(openai.InternalServerError) as info:
            greedy(client, RED, model="vision-fp8", max_tokens=2)
        assert info.value.body["code"] == "model_not_loaded"
        assert greedy(client, RED, max_tokens=2)  # the other vision model keeps serving
    finally:
        set_model_loaded("vision-fp8", True)
    assert greedy(client, RED, model="vision-fp8", max_tokens=2)
