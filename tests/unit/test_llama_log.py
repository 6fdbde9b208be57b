"""How llama.cpp's log messages become records (no llama.cpp needed: the callback's line logic)."""

from __future__ import annotations

import logging

import pytest

from deployments.engines import llama_log
from deployments.engines.llama_log import (
    GGML_LOG_LEVEL_CONT,
    GGML_LOG_LEVEL_DEBUG,
    GGML_LOG_LEVEL_ERROR,
    GGML_LOG_LEVEL_INFO,
    GGML_LOG_LEVEL_WARN,
)


def seen(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    return [(r.levelname, r.getMessage()) for r in caplog.records if r.name == llama_log.logger.name]


def test_levels_follow_the_vendored_numbering(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=llama_log.logger.name)
    lines = llama_log._Lines()
    for level, text in [
        (GGML_LOG_LEVEL_DEBUG, "d\n"),
        (GGML_LOG_LEVEL_INFO, "i\n"),
        (GGML_LOG_LEVEL_WARN, "w\n"),
        (GGML_LOG_LEVEL_ERROR, "e\n"),
    ]:
        lines.write(level, text)
    assert seen(caplog) == [("DEBUG", "d"), ("DEBUG", "i"), ("WARNING", "w"), ("ERROR", "e")]


def test_a_line_written_in_pieces_is_one_record_at_its_first_level(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=llama_log.logger.name)
    lines = llama_log._Lines()
    lines.write(GGML_LOG_LEVEL_WARN, "loading")
    lines.write(GGML_LOG_LEVEL_CONT, ".")
    lines.write(GGML_LOG_LEVEL_CONT, ".\n")
    lines.write(GGML_LOG_LEVEL_ERROR, "unfinished")
    lines.write(GGML_LOG_LEVEL_INFO, "next\n")  # a new message ends the unfinished line
    assert seen(caplog) == [("WARNING", "loading.."), ("ERROR", "unfinished"), ("DEBUG", "next")]


def test_by_default_only_warnings_and_errors_are_recorded(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=llama_log.logger.name)
    lines = llama_log._Lines()
    lines.write(GGML_LOG_LEVEL_INFO, "llama_context: n_ctx = 512\n")
    lines.write(GGML_LOG_LEVEL_DEBUG, "graph_reserve: ...\n")
    lines.write(GGML_LOG_LEVEL_WARN, "n_ctx_seq (4096) > n_ctx_train (2048)\n")
    assert seen(caplog) == [("WARNING", "n_ctx_seq (4096) > n_ctx_train (2048)")]
