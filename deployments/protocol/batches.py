"""OpenAI's Files and Batch APIs: the calls' bodies, the input file's lines, and the objects returned.

A batch's input is JSONL, one request per line: ``{"custom_id", "method": "POST", "url", "body"}``.
A file that is not such a list fails the batch at validation, every problem named by its line
(OpenAI's ``errors.data[].line``); a line whose ``body`` is a bad request fails that line only,
in the error file, as the same request over HTTP would.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

Endpoint = Literal["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]
ENDPOINTS: tuple[str, ...] = Endpoint.__args__  # type: ignore[attr-defined]
MAX_LISTED_ERRORS = 100  # problems of an input file reported, as OpenAI lists a sample


class BatchStatus(StrEnum):
    VALIDATING = "validating"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (BatchStatus.FAILED, BatchStatus.COMPLETED, BatchStatus.EXPIRED, BatchStatus.CANCELLED)


class BatchCreateRequest(BaseModel):
    """``POST /v1/batches``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input_file_id: str = Field(min_length=1)
    endpoint: Endpoint
    completion_window: Literal["24h"] = "24h"
    metadata: dict[str, str] | None = Field(default=None, max_length=16)


class BatchLine(BaseModel):
    """One line of a batch input file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    custom_id: str = Field(min_length=1, max_length=512)
    method: Literal["POST"]
    url: Endpoint
    body: dict[str, Any]


@dataclass
class InputScan:
    """What validating an input file found: its request count, or why it cannot run."""

    total: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)
    error_count: int = 0

    def fail(self, line: int | None, code: str, message: str, param: str | None = None) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_LISTED_ERRORS:
            self.errors.append({"code": code, "message": message, "param": param, "line": line})


def parse_line(raw: bytes | str) -> BatchLine:
    """A line of an input file; raises ``ValueError`` saying what is wrong with it."""
    try:
        return BatchLine.model_validate_json(raw)
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_url=False):
            where = ".".join(str(part) for part in error["loc"])
            if error["type"] == "json_invalid":
                problems.append(f"not valid JSON ({error['ctx']['error']})")
            elif error["type"] == "extra_forbidden":
                problems.append(f"{where}: unknown field")
            else:
                problems.append(f"{where}: {error['msg']}" if where else error["msg"])
        raise ValueError("; ".join(problems)) from None


def scan_input(lines: Iterable[bytes], endpoint: str, max_requests: int) -> InputScan:
    """Check every line of an input file against the batch's endpoint (1-based line numbers;
    blank lines are skipped, as JSONL readers do)."""
    scan = InputScan()
    seen: set[str] = set()
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        scan.total += 1
        try:
            line = parse_line(raw)
        except ValueError as exc:
            scan.fail(number, "invalid_line", f"line {number}: {exc}")
            continue
        if line.url != endpoint:
            scan.fail(number, "mismatched_url", f"line {number}: url {line.url} is not the batch's endpoint {endpoint}")
        if line.custom_id in seen:
            scan.fail(number, "duplicate_custom_id", f"line {number}: custom_id {line.custom_id!r} is used twice")
        seen.add(line.custom_id)
    if scan.total == 0:
        scan.fail(None, "empty_file", "the input file holds no requests")
    elif scan.total > max_requests:
        scan.fail(None, "too_many_requests", f"{scan.total} requests exceed the limit of {max_requests} per batch")
    return scan


def new_id(prefix: str) -> str:
    """OpenAI-style ids: ``file-...``, ``batch_...``, ``batch_req_...``."""
    return f"{prefix}{uuid.uuid4().hex}"


def line_output(custom_id: str, request_id: str, status_code: int, body: dict[str, Any]) -> bytes:
    """A line of the output file (2xx) or the error file (a request that failed), as OpenAI writes them."""
    response = {"status_code": status_code, "request_id": request_id, "body": body}
    return _jsonl({"id": request_id, "custom_id": custom_id, "response": response, "error": None})


def line_not_run(custom_id: str, code: str, message: str) -> bytes:
    """A line of the error file for a request the batch never ran (it expired or was cancelled first)."""
    error = {"code": code, "message": message}
    return _jsonl({"id": new_id("batch_req_"), "custom_id": custom_id, "response": None, "error": error})


def _jsonl(value: dict[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


class BatchListQuery(BaseModel):
    """``GET /v1/batches``' query: newest first, a page after the batch ``after``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    after: str | None = None
    limit: int = Field(default=20, ge=1, le=100)


class FileListQuery(BaseModel):
    """``GET /v1/files``' query."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    purpose: str | None = None
    after: str | None = None
    limit: int = Field(default=10_000, ge=1, le=10_000)
    order: Literal["asc", "desc"] = "desc"
