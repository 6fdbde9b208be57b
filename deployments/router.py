"""The router: HTTP ingress (OpenAI API) and Python handle API, over ``serving``'s per-API classes.

Routes stay thin. A streaming response settles its HTTP status before any byte is sent:
validation, model lookup and the first chunk (which proves the engine accepted the request)
all happen first, so early failures are real 4xx/5xx responses. After that, an error
becomes one final SSE ``{"error": ...}`` event followed by ``data: [DONE]``.

(No ``from __future__ import annotations`` here: FastAPI must see real annotations on the
ingress methods.)
"""

import hmac
import ipaddress
import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from deployments import constants as C
from deployments.config import AppConfig, RouterConfig
from deployments.errors import (
    InvalidRequest,
    PayloadTooLarge,
    ServeError,
    Unauthorized,
    UnsupportedMediaType,
    as_serve_error,
    classified_exceptions,
)
from deployments.metrics import router_metrics
from deployments.protocol.batches import BatchCreateRequest, BatchListQuery, FileListQuery
from deployments.protocol.chat import ChatCompletionRequest
from deployments.protocol.common import OPENAI_EVENTS, EventStream
from deployments.protocol.completions import CompletionRequest
from deployments.protocol.embeddings import EmbeddingRequest
from deployments.protocol.messages import EVENTS as MESSAGE_EVENTS
from deployments.protocol.messages import CountTokensRequest, MessagesRequest
from deployments.protocol.messages import error_body as message_error_body
from deployments.protocol.responses import EVENTS as RESPONSE_EVENTS
from deployments.protocol.responses import ResponsesRequest
from deployments.protocol.tokenize import DetokenizeRequest, TokenizeRequest
from deployments.serving.chat import ChatServing
from deployments.serving.completions import CompletionServing
from deployments.serving.core import ServingCore, new_request_id, parse_request
from deployments.serving.embeddings import EmbeddingServing
from deployments.serving.messages import MessagesServing
from deployments.serving.models import ModelCatalog
from deployments.serving.responses import ResponsesServing
from deployments.serving.tokenize import TokenizeServing

logger = logging.getLogger("ray.serve")

_FORM_OVERHEAD_BYTES = 64 * 2**10  # multipart headers and boundaries around an upload's contents

api = FastAPI(title="nika-serve", description="OpenAI-compatible chat for local GGUF and vision models")


def _error_body(path: str) -> Callable[[ServeError], dict[str, Any]]:
    """Each API's own error shape: Anthropic's under /v1/messages, OpenAI's elsewhere."""
    return message_error_body if path.startswith("/v1/messages") else ServeError.to_body


async def _any_error(request: Request, exc: Exception) -> JSONResponse:
    """Every error a route raises, ours or not, leaves as one body in its API's shape."""
    return error_response(exc, _error_body(request.url.path))


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """Starlette's own errors (no such route, wrong method) in the same shape, with their status."""
    code = "not_found" if exc.status_code == 404 else f"http_{exc.status_code}"
    error = InvalidRequest(f"{request.method} {request.url.path}: {exc.detail}", code=code)
    return JSONResponse(_error_body(request.url.path)(error), exc.status_code, headers=exc.headers)


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error in the taxonomy's shape. Starlette sends the response of a handler for
    ``Exception`` and then re-raises the error for the server to log, so behind that handler alone
    Serve's replica and proxy logged every 4xx as a failed request, traceback and all. The errors
    the taxonomy classifies are answers: their handlers run in Starlette's exception middleware,
    which does not re-raise. Only unexpected ones (500, logged by ``as_serve_error``) still are."""
    app.add_exception_handler(Exception, _any_error)
    for cls in classified_exceptions():
        app.add_exception_handler(cls, _any_error)
    app.add_exception_handler(HTTPException, _http_error)


install_error_handlers(api)


def error_response(
    exc: BaseException, body: Callable[[ServeError], dict[str, Any]] = ServeError.to_body
) -> JSONResponse:
    error = as_serve_error(exc)
    if error.status_code < 500 or error.status_code == 503:
        router_metrics().rejected_requests.inc(tags={"cause": error.code})
    return JSONResponse(body(error), status_code=error.status_code, headers=error.headers())


async def _authenticate(request: Request) -> None:
    """Require the router's API key, when it has one, as ``Authorization: Bearer <key>`` (OpenAI's
    clients) or ``x-api-key: <key>`` (Anthropic's). Async: FastAPI would run a plain function on
    its thread pool, a thread hop per request."""
    key: str | None = getattr(request.app.state, "api_key", None)
    if key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token if scheme.lower() == "bearer" else request.headers.get("x-api-key", "")
    if not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise Unauthorized("missing or invalid API key: send `Authorization: Bearer <key>` or `x-api-key: <key>`")


async def _read_json_body(request: Request, limit: int) -> bytes:
    """The body, refused before it is read when its declared type or size is wrong."""
    media_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise UnsupportedMediaType(f"Content-Type must be application/json, not {media_type}")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body of {declared} bytes exceeds the limit of {limit} bytes")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
    return bytes(body)


async def _read_upload(request: Request, limit: int) -> tuple[str, str, bytes]:
    """(filename, purpose, contents) of a ``multipart/form-data`` upload (OpenAI's ``files.create``)."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "multipart/form-data":
        raise UnsupportedMediaType(
            f"Content-Type must be multipart/form-data (fields file and purpose), not {media_type}"
        )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit + _FORM_OVERHEAD_BYTES:
        raise PayloadTooLarge(f"upload of {declared} bytes exceeds the limit of {limit} bytes (batch.max_file_bytes)")
    async with request.form(max_files=1, max_fields=4) as form:
        upload, purpose = form.get("file"), form.get("purpose")
        if not isinstance(upload, UploadFile):
            raise InvalidRequest("file: required, the file's contents as a multipart file field")
        if not isinstance(purpose, str) or not purpose:
            raise InvalidRequest("purpose: required (batch)")
        data = await upload.read(limit + 1)
    if len(data) > limit:
        raise PayloadTooLarge(f"file exceeds the limit of {limit} bytes (batch.max_file_bytes)")
    return upload.filename or "upload.jsonl", purpose, data


async def _sse(
    first: dict[str, Any], chunks: AsyncIterator[dict[str, Any]], framing: EventStream
) -> AsyncIterator[bytes]:
    async with aclosing(chunks):
        try:
            yield framing.event(first)
            async for chunk in chunks:
                yield framing.event(chunk)
        except Exception as exc:  # headers are out: the error travels as the last event
            yield framing.event(framing.error(as_serve_error(exc)))
        if framing.done:
            yield framing.done


async def _streaming_response(
    chunks: AsyncIterator[dict[str, Any]], framing: EventStream = OPENAI_EVENTS
) -> StreamingResponse:
    """SSE once the first chunk is in: an error before it is still a real status."""
    try:
        first = await anext(chunks)
    except BaseException:
        await chunks.aclose()
        raise
    return StreamingResponse(_sse(first, chunks, framing), media_type="text/event-stream")


def _warn_if_open() -> None:
    """Say so in the log when anyone on the network can use the models: a key is not set and
    Serve's HTTP proxy listens beyond loopback."""
    from ray.serve.context import _get_global_client

    host = _get_global_client().http_config.host
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        loopback = False
    if not loopback:
        logger.warning(
            "serving on %s without an API key: anyone who can reach this address can use the models; "
            "set router.api_key_env (README: Security) or bind http_options.host to 127.0.0.1",
            host,
        )


def router_deployment_options(config: RouterConfig) -> dict[str, Any]:
    """Serve options of the router: its config over the router defaults.

    The router only awaits I/O, so one replica holds many requests. Its queue at the HTTP
    proxy is bounded too: past it, the proxy answers 503 with ``Retry-After``.
    """
    defaults = {
        "max_ongoing_requests": C.DEFAULT_ROUTER_MAX_ONGOING_REQUESTS,
        "max_queued_requests": C.DEFAULT_ROUTER_MAX_QUEUED_REQUESTS,
        "backpressure_config": {"status_code": 503, "retry_after_s": C.RETRY_AFTER_S},
        "ray_actor_options": {"num_cpus": 0.5},
    }
    return config.deployment.serve_options(defaults, C.SERVE_DATA_PATH_ENV)


@serve.deployment
@serve.ingress(api)
class Router:
    """Routes chat requests to the model deployments by the ``model`` field."""

    def __init__(self, config: dict[str, Any], models: dict[str, DeploymentHandle], batches: DeploymentHandle) -> None:
        app_config = AppConfig.model_validate(config)
        self._batches = batches
        self._max_file_bytes = app_config.batch.max_file_bytes
        core = ServingCore(app_config, models)
        self._chat = ChatServing(core)
        self._messages = MessagesServing(core, self._chat)
        self._responses = ResponsesServing(self._chat)
        self._completions = CompletionServing(core)
        self._embeddings = EmbeddingServing(core)
        self._tokenizer = TokenizeServing(core)
        self._catalog = ModelCatalog(app_config, models)
        self._max_body_bytes = app_config.router.max_body_bytes
        key_env = app_config.router.api_key_env
        if key_env is not None and not os.environ.get(key_env):
            # Serving openly because a secret is missing would be worse than not serving.
            raise ValueError(
                f"router.api_key_env is {key_env!r}, but that variable is empty in the router's environment"
            )
        api.state.api_key = os.environ[key_env] if key_env else None
        if key_env is None:
            _warn_if_open()

    # -- HTTP --------------------------------------------------------------------------

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/v1/models", dependencies=[Depends(_authenticate)])
    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": await self._catalog.list_models()}

    @api.post("/v1/chat/completions", dependencies=[Depends(_authenticate)])
    async def chat_completions(self, request: Request) -> Any:
        body = parse_request(await _read_json_body(request, self._max_body_bytes), ChatCompletionRequest)
        request_id = new_request_id()
        prepared = await self._chat.prepare(body, request_id)
        if not body.stream:
            return JSONResponse(await self._chat.complete(prepared, request_id))
        return await _streaming_response(self._chat.stream(prepared, request_id))

    @api.post("/v1/completions", dependencies=[Depends(_authenticate)])
    async def completions(self, request: Request) -> Any:
        body = parse_request(await _read_json_body(request, self._max_body_bytes), CompletionRequest)
        request_id = new_request_id("cmpl")
        prepared = self._completions.prepare(body, request_id)
        if not body.stream:
            return JSONResponse(await self._completions.complete(prepared, request_id))
        return await _streaming_response(self._completions.stream(prepared, request_id))

    @api.post("/v1/embeddings", dependencies=[Depends(_authenticate)])
    async def embeddings(self, request: Request) -> dict[str, Any]:
        body = parse_request(await _read_json_body(request, self._max_body_bytes), EmbeddingRequest)
        return await self._embeddings.embed(body)

    @api.post("/v1/responses", dependencies=[Depends(_authenticate)])
    async def responses(self, request: Request) -> Any:
        """OpenAI's Responses API, stateless (its named-event stream)."""
        body = parse_request(await _read_json_body(request, self._max_body_bytes), ResponsesRequest)
        response_id = new_request_id("resp")
        prepared = await self._responses.prepare(body, response_id)
        if not body.stream:
            return JSONResponse(await self._responses.complete(prepared, body, response_id))
        return await _streaming_response(self._responses.stream(prepared, body, response_id), RESPONSE_EVENTS)

    @api.post("/v1/messages", dependencies=[Depends(_authenticate)])
    async def messages(self, request: Request) -> Any:
        """Anthropic's Messages API (its error shape, its event stream)."""
        body = parse_request(await _read_json_body(request, self._max_body_bytes), MessagesRequest)
        message_id = new_request_id("msg")
        prepared = await self._messages.prepare(body, message_id)
        if not body.stream:
            return JSONResponse(await self._messages.complete(prepared, message_id))
        return await _streaming_response(self._messages.stream(prepared, message_id), MESSAGE_EVENTS)

    @api.post("/v1/messages/count_tokens", dependencies=[Depends(_authenticate)])
    async def count_tokens(self, request: Request) -> dict[str, Any]:
        body = parse_request(await _read_json_body(request, self._max_body_bytes), CountTokensRequest)
        return await self._messages.count_tokens(body)

    @api.post("/tokenize", dependencies=[Depends(_authenticate)])
    async def tokenize(self, request: Request) -> dict[str, Any]:
        body = parse_request(await _read_json_body(request, self._max_body_bytes), TokenizeRequest)
        return await self._tokenizer.tokenize(body)

    @api.post("/detokenize", dependencies=[Depends(_authenticate)])
    async def detokenize(self, request: Request) -> dict[str, Any]:
        body = parse_request(await _read_json_body(request, self._max_body_bytes), DetokenizeRequest)
        return await self._tokenizer.detokenize(body)

    # -- Files and Batches: the batch runner owns them ------------------------------------

    @api.post("/v1/files", dependencies=[Depends(_authenticate)])
    async def create_file(self, request: Request) -> dict[str, Any]:
        filename, purpose, data = await _read_upload(request, self._max_file_bytes)
        return await self._batches.create_file.remote(filename, purpose, data)

    @api.get("/v1/files", dependencies=[Depends(_authenticate)])
    async def files(self, request: Request) -> dict[str, Any]:
        query = parse_request(dict(request.query_params), FileListQuery)
        return await self._batches.files.remote(query.purpose, query.after, query.limit, query.order)

    @api.get("/v1/files/{file_id}", dependencies=[Depends(_authenticate)])
    async def file(self, file_id: str) -> dict[str, Any]:
        return await self._batches.file.remote(file_id)

    @api.get("/v1/files/{file_id}/content", dependencies=[Depends(_authenticate)])
    async def file_content(self, file_id: str) -> StreamingResponse:
        size = (await self._batches.file.remote(file_id))["bytes"]  # a missing file is a 404, not a cut stream
        chunks = self._batches.options(stream=True).file_content.remote(file_id)
        return StreamingResponse(chunks, media_type="application/octet-stream", headers={"content-length": str(size)})

    @api.delete("/v1/files/{file_id}", dependencies=[Depends(_authenticate)])
    async def delete_file(self, file_id: str) -> dict[str, Any]:
        return await self._batches.delete_file.remote(file_id)

    @api.post("/v1/batches", dependencies=[Depends(_authenticate)])
    async def create_batch(self, request: Request) -> dict[str, Any]:
        body = parse_request(await _read_json_body(request, self._max_body_bytes), BatchCreateRequest)
        return await self._batches.create_batch.remote(body.model_dump())

    @api.get("/v1/batches", dependencies=[Depends(_authenticate)])
    async def batches(self, request: Request) -> dict[str, Any]:
        query = parse_request(dict(request.query_params), BatchListQuery)
        return await self._batches.batches.remote(query.after, query.limit)

    @api.get("/v1/batches/{batch_id}", dependencies=[Depends(_authenticate)])
    async def batch(self, batch_id: str) -> dict[str, Any]:
        return await self._batches.batch.remote(batch_id)

    @api.post("/v1/batches/{batch_id}/cancel", dependencies=[Depends(_authenticate)])
    async def cancel_batch(self, batch_id: str) -> dict[str, Any]:
        return await self._batches.cancel_batch.remote(batch_id)

    # -- Python API (deployment handles), mirroring nika's infer* methods -------------

    async def infer(self, request: dict[str, Any] | ChatCompletionRequest) -> dict[str, Any]:
        """One ``chat.completion`` dict; raises a ``ServeError`` subclass on failure."""
        return await self._complete(request, require_images=False)

    async def infer_stream(self, request: dict[str, Any] | ChatCompletionRequest) -> AsyncIterator[dict[str, Any]]:
        """``chat.completion.chunk`` dicts; call with ``handle.options(stream=True)``."""
        async for chunk in self._stream(request, require_images=False):
            yield chunk

    async def infer_vision(self, request: dict[str, Any] | ChatCompletionRequest) -> dict[str, Any]:
        """As ``infer``, for a request that must carry at least one image."""
        return await self._complete(request, require_images=True)

    async def infer_vision_stream(
        self, request: dict[str, Any] | ChatCompletionRequest
    ) -> AsyncIterator[dict[str, Any]]:
        """As ``infer_stream``, for a request that must carry at least one image."""
        async for chunk in self._stream(request, require_images=True):
            yield chunk

    async def _complete(self, request: dict[str, Any] | ChatCompletionRequest, require_images: bool) -> dict[str, Any]:
        request_id = new_request_id()
        body = parse_request(request, ChatCompletionRequest)
        prepared = await self._chat.prepare(body, request_id, require_images=require_images)
        return await self._chat.complete(prepared, request_id)

    async def _stream(
        self, request: dict[str, Any] | ChatCompletionRequest, require_images: bool
    ) -> AsyncIterator[dict[str, Any]]:
        request_id = new_request_id()
        body = parse_request(request, ChatCompletionRequest)
        prepared = await self._chat.prepare(body, request_id, require_images=require_images)
        async with aclosing(self._chat.stream(prepared, request_id)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def list_models(self) -> list[dict[str, Any]]:
        return await self._catalog.list_models()
