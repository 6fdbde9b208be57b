"""llama.cpp's own log, into Python logging: no file descriptor of the process is touched.

llama-cpp-python's ``verbose=False`` silences llama.cpp by ``dup2``-ing /dev/null over fds 1 and
2 around a model load: process-wide and unlocked, in a replica whose other threads (Serve's
event loops, Ray's) keep writing; it also swallowed faulthandler's report of a crash at load on
CUDA. Instead, one callback, set once per process with ``llama_log_set`` (llama.cpp keeps a bare
pointer to it, so it lives at module level), hands every message to the ``ray.serve.llama_cpp``
logger, a child of the replica's. llama.cpp's INFO and DEBUG become DEBUG records: by default a
replica shows llama.cpp's warnings and errors; at DEBUG it shows everything llama.cpp says.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from typing import Any

logger = logging.getLogger("ray.serve.llama_cpp")

# enum ggml_log_level, as the vendored ggml.h numbers it (llama-cpp-python's _logger.py uses an
# older numbering, under which its set_verbose(False) prints warnings and hides errors).
GGML_LOG_LEVEL_DEBUG = 1
GGML_LOG_LEVEL_INFO = 2
GGML_LOG_LEVEL_WARN = 3
GGML_LOG_LEVEL_ERROR = 4
GGML_LOG_LEVEL_CONT = 5  # continues the previous message
LEVELS = {
    GGML_LOG_LEVEL_DEBUG: logging.DEBUG,
    GGML_LOG_LEVEL_INFO: logging.DEBUG,
    GGML_LOG_LEVEL_WARN: logging.WARNING,
    GGML_LOG_LEVEL_ERROR: logging.ERROR,
}


class _Lines:
    """llama.cpp writes a line in pieces (CONT continues the previous level): one record per line."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # llama.cpp logs from whichever thread runs it
        self._text = ""
        self._level = logging.DEBUG

    def write(self, level: int, text: str) -> None:
        with self._lock:
            if level != GGML_LOG_LEVEL_CONT:
                if self._text:  # an unfinished line, then a new message: the line is done
                    self._emit()
                self._level = LEVELS.get(level, logging.WARNING)
            self._text += text
            if self._text.endswith("\n"):
                self._emit()

    def _emit(self) -> None:
        text, self._text = self._text.rstrip(), ""
        if text and logger.isEnabledFor(self._level):
            logger.log(self._level, "%s", text)


_lines = _Lines()
_callback: Any = None  # the ctypes function llama.cpp calls; must outlive every call


def install() -> None:
    """Route llama.cpp's log (and ggml's) to :data:`logger`; idempotent, once per process."""
    global _callback
    if _callback is not None:
        return
    import llama_cpp  # its own import sets llama-cpp-python's callback (to stderr): replace it after

    @llama_cpp.llama_log_callback
    def forward(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
        _lines.write(level, text.decode("utf-8", errors="replace"))

    _callback = forward
    llama_cpp.llama_log_set(_callback, ctypes.c_void_p(0))
