"""The Batch API without Ray: input validation with line numbers, output lines, the durable store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from deployments.batch.store import Store
from deployments.config import BatchConfig
from deployments.errors import NotFound
from deployments.protocol.batches import (
    BatchStatus,
    line_not_run,
    line_output,
    parse_line,
    scan_input,
)

CHAT = "/v1/chat/completions"


def line(custom_id: str, url: str = CHAT, **body: object) -> bytes:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": {"model": "m", **body}}).encode()


def test_a_valid_file_counts_its_requests_and_skips_blank_lines() -> None:
    scan = scan_input([line("a"), b"", b"  ", line("b")], CHAT, max_requests=10)
    assert (scan.total, scan.errors) == (2, [])


def test_every_problem_of_a_file_is_named_by_its_line() -> None:
    lines = [
        line("a"),
        b"{not json",
        line("a"),  # duplicate
        line("c", url="/v1/embeddings"),
        json.dumps({"custom_id": "d", "method": "GET", "url": CHAT, "body": {}}).encode(),
        json.dumps({"method": "POST", "url": CHAT, "body": {}}).encode(),
    ]
    scan = scan_input(lines, CHAT, max_requests=10)
    found = {(e["line"], e["code"]) for e in scan.errors}
    assert found == {
        (2, "invalid_line"),
        (3, "duplicate_custom_id"),
        (4, "mismatched_url"),
        (5, "invalid_line"),
        (6, "invalid_line"),
    }
    by_line = {e["line"]: e["message"] for e in scan.errors}
    assert "not valid JSON" in by_line[2]
    assert "method" in by_line[5] and "custom_id" in by_line[6]


def test_empty_and_oversized_files_fail_as_a_whole() -> None:
    assert scan_input([b"", b"\n"], CHAT, 10).errors[0]["code"] == "empty_file"
    too_many = scan_input([line(str(i)) for i in range(3)], CHAT, max_requests=2)
    assert [e["code"] for e in too_many.errors] == ["too_many_requests"]


def test_listed_problems_are_bounded_and_counted() -> None:
    scan = scan_input([b"x"] * 250, CHAT, max_requests=1000)
    assert scan.error_count == 250 and len(scan.errors) == 100


def test_output_lines_have_openai_shapes() -> None:
    ok = json.loads(line_output("a", "batch_req_1", 200, {"id": "chatcmpl-1"}))
    assert ok == {
        "id": "batch_req_1",
        "custom_id": "a",
        "response": {"status_code": 200, "request_id": "batch_req_1", "body": {"id": "chatcmpl-1"}},
        "error": None,
    }
    never = json.loads(line_not_run("b", "batch_expired", "the batch expired"))
    assert never["response"] is None and never["error"]["code"] == "batch_expired" and never["custom_id"] == "b"
    assert parse_line(line("x")).custom_id == "x"


def test_the_runner_is_one_replica_and_paths_are_absolute(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="exactly one replica"):
        BatchConfig.model_validate({"deployment": {"num_replicas": 2}})
    config = BatchConfig.model_validate({"database": "state/b.sqlite3", "files_uri": "state/files"})
    assert config.database.is_absolute() and Path(config.files_uri).is_absolute()
    assert BatchConfig.model_validate({"files_uri": "s3://bucket/batches"}).files_uri == "s3://bucket/batches"


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "db" / "batches.sqlite3", str(tmp_path / "files"))


def test_files_are_stored_listed_read_and_deleted(store: Store) -> None:
    first = store.add_file("a.jsonl", "batch", [b"one\n", b"two"])
    second = store.add_file("b.jsonl", "batch", [b"x" * (3 * 2**20)])
    assert first["bytes"] == 7 and first["object"] == "file" and first["id"].startswith("file-")
    assert list(store.read_lines(first["id"])) == [b"one", b"two"]
    assert b"".join(store.read_chunks(second["id"])) == b"x" * (3 * 2**20)
    page = store.files(purpose="batch", after=None, limit=1, order="desc")
    assert [f["id"] for f in page.data] == [second["id"]] and page.has_more
    rest = store.files(purpose="batch", after=second["id"], limit=10, order="desc")
    assert [f["id"] for f in rest.data] == [first["id"]] and not rest.has_more
    assert store.files(purpose="batch_output", after=None, limit=10, order="asc").data == []
    assert store.delete_file(first["id"]) == {"id": first["id"], "object": "file", "deleted": True}
    with pytest.raises(NotFound):
        store.file(first["id"])
    with pytest.raises(NotFound):
        store.read_chunks(first["id"])


def test_a_batch_moves_through_its_statuses_with_their_times(store: Store) -> None:
    file = store.add_file("in.jsonl", "batch", [line("a") + b"\n" + line("b")])
    batch = store.add_batch(CHAT, file["id"], "24h", 86400, {"job": "captions"})
    assert batch["status"] == "validating" and batch["expires_at"] == batch["created_at"] + 86400
    assert batch["metadata"] == {"job": "captions"} and batch["errors"] is None
    assert store.batch_using(file["id"]) == batch["id"]
    batch = store.set_status(batch["id"], BatchStatus.IN_PROGRESS, total=2)
    assert batch["in_progress_at"] is not None and batch["request_counts"] == {"total": 2, "completed": 0, "failed": 0}
    store.set_status(batch["id"], BatchStatus.COMPLETED, output_file_id="file-x")
    assert store.batch_using(file["id"]) is None and store.unfinished_batches() == []
    failed = store.add_batch(CHAT, file["id"], "24h", 86400, None)
    errors = [{"code": "invalid_line", "message": "line 1: ...", "param": None, "line": 1}]
    failed = store.set_status(failed["id"], BatchStatus.FAILED, errors=errors)
    assert failed["errors"] == {"object": "list", "data": errors} and failed["failed_at"] is not None
    assert [b["id"] for b in store.batches(after=None, limit=10).data] == [failed["id"], batch["id"]]


def test_a_result_is_recorded_once_and_survives_a_new_store(store: Store, tmp_path: Path) -> None:
    file = store.add_file("in.jsonl", "batch", [b"{}"])
    batch = store.add_batch(CHAT, file["id"], "24h", 86400, None)
    store.set_status(batch["id"], BatchStatus.IN_PROGRESS, total=3)
    assert store.add_result(batch["id"], 3, "c", True, b"third\n")
    assert store.add_result(batch["id"], 1, "a", False, b"first\n")
    assert not store.add_result(batch["id"], 1, "a", True, b"again\n")  # a rerun line changes nothing
    reopened = Store(tmp_path / "db" / "batches.sqlite3", str(tmp_path / "files"))
    assert reopened.done_lines(batch["id"]) == {1, 3}
    assert list(reopened.results(batch["id"], ok=False)) == [b"first\n"]
    assert list(reopened.results(batch["id"], ok=True)) == [b"third\n"]
    assert reopened.batch(batch["id"])["request_counts"] == {"total": 3, "completed": 1, "failed": 1}
    assert [b["id"] for b in reopened.unfinished_batches()] == [batch["id"]]


def test_file_contents_go_wherever_pyarrow_fs_opens_a_uri(tmp_path: Path) -> None:
    """``files_uri`` is a URI for Ray's filesystem layer (s3://, gs://, file://), not only a folder."""
    store = Store(tmp_path / "state.sqlite3", (tmp_path / "objects").as_uri())
    file = store.add_file("in.jsonl", "batch", [line("a")])
    assert (tmp_path / "objects" / file["id"]).read_bytes() == line("a")
    assert list(store.read_lines(file["id"])) == [line("a")]
