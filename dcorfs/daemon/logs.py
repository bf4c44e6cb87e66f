"""Logging of the daemon: one format, a file or stderr, and a filter that hides the token."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class RedactFilter(logging.Filter):
    """Replaces every occurrence of the secrets in a record's final message."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self._secrets = [s for s in secrets if s]

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._secrets:
            return True
        message = record.getMessage()
        text = message
        for secret in self._secrets:
            text = text.replace(secret, "<token>")
        if record.exc_info and record.exc_text is None:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            for secret in self._secrets:
                record.exc_text = record.exc_text.replace(secret, "<token>")
        if text != message:
            record.msg, record.args = text, None
        return True


def configure(
    *, level: str, log_file: Path | None, stderr: bool, secrets: list[str]
) -> logging.Handler | None:
    """Log to `log_file` (0600) and/or stderr; returns the file handler (or None). Only
    dcorfs's own records are written; those of botocore's signer (canonical requests with the
    S3 access key id) and urllib3 (URLs with presigned query strings) are not even made."""
    for chatty in ("botocore", "urllib3"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    root = logging.getLogger("dcorfs")
    root.setLevel(level.upper())
    root.propagate = False
    redact = RedactFilter(secrets)
    handlers: list[logging.Handler] = []
    file_handler = None
    if log_file is not None:
        log_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.close(os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
        file_handler = logging.FileHandler(log_file)
        handlers.append(file_handler)
    if stderr:
        handlers.append(logging.StreamHandler(sys.stderr))
    for handler in handlers:
        handler.setFormatter(logging.Formatter(FORMAT))
        handler.addFilter(redact)
        root.addHandler(handler)
    return file_handler
