import asyncio
import pickle

import pytest
from ray import exceptions as ray_exceptions
from ray.serve.exceptions import BackPressureError, RequestCancelledError

from deployments.errors import (
    Cancelled,
    InferenceFailed,
    InferenceTimeout,
    InternalError,
    InvalidRequest,
    ModelLoadFailed,
    ModelNotFound,
    ModelNotLoaded,
    Overloaded,
    ServeError,
    as_serve_error,
)


@pytest.mark.parametrize(
    ("error", "status", "error_type"),
    [
        (InvalidRequest("x"), 400, "invalid_request_error"),
        (ModelNotFound("x"), 404, "invalid_request_error"),
        (Cancelled("x"), 499, "cancelled"),
        (InferenceFailed("x"), 502, "server_error"),
        (InternalError("x"), 500, "server_error"),
        (ModelLoadFailed("x"), 503, "service_unavailable"),
        (ModelNotLoaded("x"), 503, "service_unavailable"),
        (Overloaded("x"), 503, "service_unavailable"),
        (InferenceTimeout("x", code="chunk_timeout"), 504, "timeout_error"),
    ],
)
def test_each_error_has_its_status_type_and_survives_pickling(error: ServeError, status: int, error_type: str) -> None:
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert (copy.status_code, copy.error_type, copy.code, copy.message) == (status, error_type, error.code, "x")
    assert copy.to_body() == {"error": {"message": "x", "type": error_type, "code": error.code}}


def test_overloaded_tells_when_to_retry() -> None:
    assert Overloaded("full").headers() == {"Retry-After": "1"}


def test_classification_is_by_type() -> None:
    assert isinstance(as_serve_error(BackPressureError(num_queued_requests=1, max_queued_requests=1)), Overloaded)
    assert isinstance(as_serve_error(RequestCancelledError("id")), Cancelled)
    assert isinstance(as_serve_error(asyncio.CancelledError()), Cancelled)
    assert isinstance(as_serve_error(ray_exceptions.ActorDiedError()), InferenceFailed)
    assert as_serve_error(ray_exceptions.ActorDiedError()).code == "replica_died"
    original = ModelNotLoaded("model m is not loaded")
    assert as_serve_error(original) is original


def test_an_unclassified_error_is_internal_and_leaks_nothing(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("ERROR", logger="ray.serve"):
        unknown = as_serve_error(ValueError("secret path /etc/x"))
    assert isinstance(unknown, InternalError) and unknown.status_code == 500
    assert "secret" not in unknown.message and "ValueError" not in unknown.message
    assert "request id" in unknown.message
    assert "secret path /etc/x" in caplog.text  # the details are in the log
