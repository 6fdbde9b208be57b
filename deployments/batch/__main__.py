"""``python -m deployments.batch run requests.jsonl -o results.jsonl``: a batch job from a JSONL file.

Uploads the file, starts a batch on the server's Batch API, shows its progress, and writes the
output (and, beside it, the error file) when it ends. The batch runs on the server: interrupting
this command leaves it running, and ``--resume BATCH_ID`` waits for it again and downloads it.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

import openai
from tqdm import tqdm

from deployments.protocol.batches import ENDPOINTS, BatchStatus, parse_line


def endpoint_of(path: Path) -> str:
    """The endpoint of the file's first request (every line must share it)."""
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            if raw.strip():
                try:
                    return parse_line(raw).url
                except ValueError as exc:
                    raise SystemExit(f"{path}: line {number}: {exc}") from None
    raise SystemExit(f"{path}: no requests in the file")


def start(client: openai.OpenAI, path: Path, endpoint: str | None) -> str:
    endpoint = endpoint or endpoint_of(path)
    with path.open("rb") as contents:
        file = client.files.create(file=(path.name, contents), purpose="batch")
    batch = client.batches.create(
        input_file_id=file.id,
        endpoint=endpoint,  # type: ignore[arg-type]
        completion_window="24h",
        metadata={"source": path.name},
    )
    print(f"batch {batch.id}: {path} uploaded as {file.id}; resume with --resume {batch.id}", file=sys.stderr)
    return batch.id


def wait(client: openai.OpenAI, batch_id: str, poll_s: float) -> openai.types.Batch:
    """Poll until the batch ends, with a progress bar of its requests."""
    with tqdm(desc=batch_id, unit="req", dynamic_ncols=True) as bar:
        while True:
            batch = client.batches.retrieve(batch_id)
            counts = batch.request_counts
            if counts is not None and counts.total:
                bar.total = counts.total
                bar.n = counts.completed + counts.failed
                bar.set_postfix(status=batch.status, failed=counts.failed, refresh=False)
                bar.refresh()
            if BatchStatus(batch.status).finished:
                return batch
            time.sleep(poll_s)


def download(client: openai.OpenAI, file_id: str | None, path: Path) -> None:
    if file_id is None:
        path.write_bytes(b"")
        return
    client.files.content(file_id).write_to_file(path)


def run(cli: argparse.Namespace) -> int:
    client = openai.OpenAI(base_url=cli.base_url, api_key=cli.api_key, max_retries=5)
    batch_id = cli.resume or start(client, cli.input, cli.endpoint)
    try:
        batch = wait(client, batch_id, cli.poll_s)
    except KeyboardInterrupt:
        print(f"\nbatch {batch_id} goes on running on the server; --resume {batch_id} to wait for it", file=sys.stderr)
        return 128 + signal.SIGINT
    errors_path = cli.errors or cli.output.with_name(cli.output.stem + ".errors.jsonl")
    download(client, batch.output_file_id, cli.output)
    download(client, batch.error_file_id, errors_path)
    counts = batch.request_counts
    done = f"{counts.completed} completed, {counts.failed} failed of {counts.total}" if counts else ""
    print(f"batch {batch_id} {batch.status}: {done}; output {cli.output}, errors {errors_path}", file=sys.stderr)
    for error in batch.errors.data if batch.errors and batch.errors.data else ():
        print(f"  {error.message}", file=sys.stderr)
    return 0 if batch.status == BatchStatus.COMPLETED else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deployments.batch", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    command = commands.add_parser("run", help="run a JSONL file of requests as a batch and download its results")
    command.add_argument("input", type=Path, nargs="?", help="JSONL: custom_id, method, url, body per line")
    command.add_argument("-o", "--output", type=Path, required=True, help="where the output file goes")
    command.add_argument("--errors", type=Path, help="where the error file goes (default: OUTPUT.errors.jsonl)")
    command.add_argument("--endpoint", choices=ENDPOINTS, help="default: the url of the file's first line")
    command.add_argument("--resume", metavar="BATCH_ID", help="wait for a batch started earlier, then download it")
    command.add_argument("--base-url", default=os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1"))
    command.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", "unused"))
    command.add_argument("--poll-s", type=float, default=2.0, help="seconds between progress checks")
    cli = parser.parse_args(argv)
    if cli.resume is None and cli.input is None:
        parser.error("run: give the input file, or --resume BATCH_ID")
    if cli.input is not None and not cli.input.is_file():
        parser.error(f"run: {cli.input} is not a file")
    try:
        return run(cli)
    except openai.APIError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
