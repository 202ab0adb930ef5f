"""Data file formats, defined once: the format a file's extension names (a `.gz`/`.bz2`/`.xz`/
`.zst` suffix looked through), opening a possibly compressed text file, and a parquet file's row
count from its footer. The login-node checks, the step estimate and the ranks' reader use these.
"""
from __future__ import annotations

import os
from typing import IO

EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv",
              ".parquet": "parquet", ".pq": "parquet", ".txt": "text", ".text": "text"}
COMPRESSED = (".gz", ".bz2", ".xz", ".zst")


def compression(path: str) -> str:
    """The compressed suffix of a file name ('.gz' ...), or ''."""
    low = path.lower()
    return next((c for c in COMPRESSED if low.endswith(c)), "")


def extension(path: str) -> str:
    """The extension that names the format: `train.jsonl.gz` -> '.jsonl'."""
    name = os.path.basename(path).lower()
    name = name[: len(name) - len(compression(name))]
    return os.path.splitext(name)[1]


def format_of(path: str) -> str | None:
    """The format the file's extension names (jsonl, json, csv, parquet, text), or None."""
    return EXTENSIONS.get(extension(path))


def open_text(path: str, errors: str = "strict") -> IO[str] | None:
    """Open a possibly compressed data file as UTF-8 text (a BOM is skipped); None for zstd."""
    import bz2
    import gzip
    import lzma
    comp = compression(path)
    if comp == ".zst":
        return None
    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(comp, open)
    return opener(path, "rt", encoding="utf-8-sig", errors=errors)


def parquet_rows(path: str) -> int | None:
    """A parquet file's row count from its footer (None without pyarrow or for a bad file)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        return None
    try:
        return int(pq.ParquetFile(path).metadata.num_rows)
    except (OSError, ValueError, TypeError):
        return None
