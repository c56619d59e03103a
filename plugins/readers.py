"""Helpers for plugins that read their own file formats, with the core's error reporting."""

from __future__ import annotations

from pathlib import Path

from finetune_flows.plugins.errors import DataError


def decode_utf8(path: Path, raw: bytes) -> str:
    """``raw`` as strict UTF-8; a bad byte is a ``DataError`` naming the file, line and the line's text."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        bad = raw[exc.start : exc.end]
        raise DataError(
            f"not valid UTF-8 (byte {bad!r} at offset {exc.start})",
            file=path,
            line=line,
            value=raw[raw.rfind(b"\n", 0, exc.start) + 1 : exc.end].decode("utf-8", "replace"),
            hint="Re-save the file as UTF-8",
        ) from exc
