"""Atomic file writes: a reader (or a resumed run) sees the old file or the new one, never half of one,
also after a crash of the machine (the data and the rename reach the disk before the call returns)."""

from __future__ import annotations

import os
from pathlib import Path


def check_output_folder(path: Path, name: str) -> None:
    """An output folder (`name`: the flag or key that gave it) may be missing, not a file: a clear error before anything runs."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"{name}: {path} exists and is not a folder")


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    tmp.replace(path)
    fsync_folder(path.parent)


def fsync_folder(folder: Path, files: bool = False) -> None:
    """Flush a folder's entries (renames, new files) to disk, and with ``files`` its files' data too."""
    if files:
        for path in folder.iterdir():
            if path.is_file():
                with open(path, "rb") as file:
                    os.fsync(file.fileno())
    directory = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
