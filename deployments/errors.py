"""One error taxonomy for every path, and one mapping from any exception to it.

The classes mirror the error kinds of nika's native runtime (model not loaded, model not
found, invalid config/request, inference failed, inference timeout, cancelled) plus the
service-level ones a cluster adds (overload, load failure, our own bugs). Each carries its
HTTP status, OpenAI error ``type`` and ``code`` so the router, the SSE stream and the Python
handle API turn it into the same error body.

What a client reads is written for the client: an exception we did not classify is our bug,
reported as ``500 internal_error`` with the request id, while its type, message and traceback
go to the log under that id.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, ClassVar

from deployments.constants import RETRY_AFTER_S

logger = logging.getLogger("ray.serve")


class ServeError(Exception):
    """Base of all errors the service reports to clients."""

    status_code: ClassVar[int] = 500
    error_type: ClassVar[str] = "server_error"
    default_code: ClassVar[str] = "internal_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code

    def __reduce__(self) -> tuple[Any, ...]:
        # Errors cross Ray handles by pickle; keep the code through the round trip.
        return (_rebuild, (type(self), self.message, self.code))

    def to_body(self) -> dict[str, Any]:
        """The OpenAI-style error body ``{"error": {"message", "type", "code"}}``."""
        return {"error": {"message": self.message, "type": self.error_type, "code": self.code}}

    def headers(self) -> dict[str, str]:
        return {}


def _rebuild(cls: type[ServeError], message: str, code: str) -> ServeError:
    return cls(message, code=code)


class InvalidRequest(ServeError):
    status_code = 400
    error_type = "invalid_request_error"
    default_code = "invalid_request"


class Unauthorized(ServeError):
    status_code = 401
    error_type = "authentication_error"
    default_code = "invalid_api_key"


class PayloadTooLarge(ServeError):
    status_code = 413
    error_type = "invalid_request_error"
    default_code = "request_too_large"


class UnsupportedMediaType(ServeError):
    status_code = 415
    error_type = "invalid_request_error"
    default_code = "unsupported_media_type"


class NotFound(ServeError):
    """No such model, file or batch."""

    status_code = 404
    error_type = "invalid_request_error"
    default_code = "not_found"


class ModelNotFound(NotFound):
    default_code = "model_not_found"


class Conflict(ServeError):
    """The object is in a state that refuses the call (a finished batch cancelled, a running batch's input deleted)."""

    status_code = 409
    error_type = "invalid_request_error"
    default_code = "conflict"


class ModelNotLoaded(ServeError):
    status_code = 503
    error_type = "service_unavailable"
    default_code = "model_not_loaded"


class Overloaded(ServeError):
    """The model's queues are full; the client should retry later."""

    status_code = 503
    error_type = "service_unavailable"
    default_code = "overloaded"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(RETRY_AFTER_S)}


class ModelLoadFailed(ServeError):
    """The model could not be loaded (bad file, missing template, engine refused it)."""

    status_code = 503
    error_type = "service_unavailable"
    default_code = "model_load_failed"


class InternalError(ServeError):
    """A failure we did not classify: a bug of ours. The log has the details."""

    status_code = 500
    error_type = "server_error"
    default_code = "internal_error"


class InferenceFailed(ServeError):
    """The engine failed while generating, or the replica serving the request died."""

    status_code = 502
    error_type = "server_error"
    default_code = "inference_failed"


class InferenceTimeout(ServeError):
    """A deadline fired; ``code`` names which one (see ``streaming.DeadlineKind``)."""

    status_code = 504
    error_type = "timeout_error"
    default_code = "request_timeout"


class Cancelled(ServeError):
    status_code = 499
    error_type = "cancelled"
    default_code = "cancelled"


def classified_exceptions() -> tuple[type[Exception], ...]:
    """The exception types :func:`as_serve_error` classifies by type: expected answers (4xx, 503,
    a cancelled or lost replica), not failures of the server."""
    from ray import exceptions as ray_exceptions
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RequestCancelledError

    return ServeError, BackPressureError, DeploymentUnavailableError, RequestCancelledError, ray_exceptions.RayError


def as_serve_error(exc: BaseException) -> ServeError:
    """Classify any exception raised on a request path into the taxonomy.

    Ray re-raises a replica's exception as ``RayTaskError`` whose ``cause`` is the
    original; unwrap it first. Classification is by type, never by message. What fits no
    class is logged with its traceback and becomes an :class:`InternalError` naming the
    request id, so no internals reach the client.
    """
    from ray import exceptions as ray_exceptions
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RequestCancelledError

    if isinstance(exc, ray_exceptions.RayTaskError) and exc.cause is not None:
        exc = exc.cause
    if isinstance(exc, ServeError):
        return exc
    if isinstance(exc, BackPressureError):
        return Overloaded("the model's request queue is full; retry later")
    if isinstance(exc, DeploymentUnavailableError):
        return ModelNotLoaded(
            "the model has no running replica (starting, or failed to load: see /v1/models)", code="model_unavailable"
        )
    if isinstance(exc, RequestCancelledError | ray_exceptions.TaskCancelledError | asyncio.CancelledError):
        return Cancelled("the request was cancelled")
    if isinstance(exc, ray_exceptions.RayActorError):
        return InferenceFailed("the model replica died while serving the request; retry", code="replica_died")
    request_id = _request_id()
    logger.error("internal error in request %s", request_id, exc_info=exc)
    return InternalError(f"internal error; the server log has the details under request id {request_id}")


def _request_id() -> str:
    from ray.serve.context import _get_serve_request_context

    return _get_serve_request_context().request_id or "unknown"
