"""Document sources: random-access sequences of ``str`` (grain ``RandomAccessDataSource`` protocol).

Every source only records *where* documents are when it is built (file paths, line offsets); the text
is read when an element is requested, so building a pipeline over a large corpus is cheap.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sysconfig
from collections.abc import Sequence

import numpy as np

#: Directory names left out of the stdlib corpus (test suites, IDLE, installed packages).
STDLIB_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"})
STDLIB_MAX_FILE_BYTES = 200_000

_GLOB_CHARS = set("*?[")


def _is_eval(rel_path: str, eval_fraction: float) -> bool:
    """Deterministic held-out split: the first 8 bytes of sha256(relative path) as a fraction of 2**64."""
    digest = hashlib.sha256(rel_path.replace(os.sep, "/").encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") < eval_fraction * 2.0**64


def held_out_documents(n: int, eval_fraction: float) -> np.ndarray:
    """``(n,)`` bool: document ``i`` is held out for eval when a hash of ``i`` (splitmix64) falls below
    ``eval_fraction``: a fixed, evenly spread split of a corpus that needs no document read."""
    x = np.arange(n, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) < eval_fraction * 2.0**53


class DocumentSubset:
    """The documents ``indices`` of a random-access source, in that order."""

    def __init__(self, source, indices: np.ndarray):
        self.source, self.indices = source, np.asarray(indices, np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> str:
        return self.source[int(self.indices[index])]

    def __repr__(self) -> str:
        return f"DocumentSubset({len(self.indices)} of {self.source!r})"


def stdlib_corpus_files(eval_fraction: float = 0.05, max_file_bytes: int = STDLIB_MAX_FILE_BYTES,
                        root: str | None = None) -> tuple[list[str], list[str]]:
    """``(train_files, eval_files)``: the ``.py`` files of the running interpreter's standard library.

    Leaves out ``site-packages``, test suites (any ``test/`` or ``tests/`` directory), ``idlelib/`` and
    files larger than ``max_file_bytes``. A file is held out for eval when a hash of its path relative to
    the stdlib root falls below ``eval_fraction``, so the split does not depend on the machine or on
    which other files exist. Both lists are sorted absolute paths.
    """
    if not 0.0 <= eval_fraction <= 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1], got {eval_fraction}")
    root = os.path.realpath(root or sysconfig.get_paths()["stdlib"])
    train, held_out = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in STDLIB_EXCLUDED_DIRS)
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            if not os.path.isfile(path) or os.path.getsize(path) > max_file_bytes:
                continue
            (held_out if _is_eval(os.path.relpath(path, root), eval_fraction) else train).append(path)
    if not train and not held_out:
        raise FileNotFoundError(f"no .py files found in the standard library directory {root!r}")
    return sorted(train), sorted(held_out)


def resolve_paths(path: str | os.PathLike, *, what: str, suffixes: Sequence[str] | None = None) -> list[str]:
    """Files named by ``path``: a file, a directory (walked recursively, hidden entries skipped; only
    names ending in one of ``suffixes`` when given) or a glob (``**`` allowed). Sorted; raises
    ``FileNotFoundError`` naming ``path`` when nothing matches."""
    if path is None:
        raise ValueError(f"{what}: a path is required")
    path = os.fspath(path)
    if os.path.isfile(path):
        return [path]
    if os.path.isdir(path):
        files = []
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            files += [os.path.join(dirpath, f) for f in filenames
                      if not f.startswith(".") and (suffixes is None or f.endswith(tuple(suffixes)))]
        if not files:
            wanted = f" with a name ending in {list(suffixes)}" if suffixes else ""
            raise FileNotFoundError(f"{what}: directory {path!r} holds no files{wanted}")
        return sorted(files)
    if _GLOB_CHARS & set(path):
        files = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f))
        if not files:
            raise FileNotFoundError(f"{what}: the pattern {path!r} matches no files")
        return files
    raise FileNotFoundError(f"{what}: {path!r} does not exist")


class TextFilesSource:
    """One document per file, decoded as UTF-8 (invalid bytes become U+FFFD)."""

    def __init__(self, paths: Sequence[str], *, what: str = "text"):
        self.paths = list(paths)
        if not self.paths:
            raise ValueError(f"{what}: no files")
        if not any(os.path.getsize(p) > 0 for p in self.paths):
            raise ValueError(f"{what}: all {len(self.paths)} files are empty (first: {self.paths[0]!r})")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> str:
        with open(self.paths[index], "rb") as f:
            return f.read().decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return f"TextFilesSource({len(self.paths)} files)"


def _line_starts(path: str, chunk_bytes: int = 1 << 24) -> np.ndarray:
    """Byte offsets of the non-empty lines of ``path`` (int64)."""
    starts, ends = [np.zeros(1, np.int64)], []
    offset = 0
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            newlines = np.flatnonzero(np.frombuffer(chunk, np.uint8) == 0x0A).astype(np.int64) + offset
            ends.append(newlines)
            starts.append(newlines + 1)
            offset += len(chunk)
    starts = np.concatenate(starts)
    ends = np.concatenate(ends + [np.array([offset], np.int64)])
    length = ends - starts  # excludes the newline itself
    return starts[length > 0]  # drop empty lines (a trailing newline makes one at the end)


class JsonlSource:
    """One document per line of JSON-lines files: the string ``record[text_field]``.

    Building it scans the files once for line offsets (no JSON parsing); lines are parsed on access.
    Empty lines are skipped; a whitespace-only line reads as an empty document.
    """

    def __init__(self, paths: Sequence[str], text_field: str = "text", *, what: str = "jsonl"):
        self.paths = list(paths)
        self.text_field = text_field
        offsets = [_line_starts(p) for p in self.paths]
        self._file_index = np.concatenate([np.full(len(o), i, np.int32) for i, o in enumerate(offsets)])
        self._offsets = np.concatenate(offsets)
        if len(self._offsets) == 0:
            raise ValueError(f"{what}: no lines in {self.paths[0] if len(self.paths) == 1 else self.paths}")

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, index: int) -> str:
        path = self.paths[int(self._file_index[index])]
        offset = int(self._offsets[index])
        with open(path, "rb") as f:
            f.seek(offset)
            line = f.readline()
        if not line.strip():
            return ""
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON in the line at byte {offset}: {e}") from None
        if not isinstance(record, dict) or self.text_field not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ValueError(f"{path}: the line at byte {offset} has no field {self.text_field!r} (has {keys}); "
                             "set DataConfig.text_field")
        text = record[self.text_field]
        if not isinstance(text, str):
            raise ValueError(f"{path}: field {self.text_field!r} of the line at byte {offset} is "
                             f"{type(text).__name__}, not a string")
        return text

    def __repr__(self) -> str:
        return f"JsonlSource({len(self.paths)} files, {len(self)} lines, field={self.text_field!r})"


class ArrayRecordTextSource:
    """Records of ArrayRecord files, each a UTF-8 document."""

    def __init__(self, paths: Sequence[str], *, what: str = "array_record"):
        import grain  # noqa: PLC0415

        self.paths = list(paths)
        try:
            self._source = grain.sources.ArrayRecordDataSource(self.paths)
        except Exception as e:  # array_record raises a bare RuntimeError/ValueError on a non-ArrayRecord file
            raise ValueError(f"{what}: cannot open {self.paths} as ArrayRecord files: {e}") from e
        if len(self._source) == 0:
            raise ValueError(f"{what}: no records in {self.paths}")

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> str:
        record = self._source[index]
        return record.decode("utf-8", errors="replace") if isinstance(record, bytes) else str(record)

    def __repr__(self) -> str:
        return f"ArrayRecordTextSource({len(self.paths)} files, {len(self)} records)"
