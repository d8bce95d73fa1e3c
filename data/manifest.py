"""Manifests: the list of training files with their captions and stream metadata.

Two formats carry the same records:

- CSV with Open-Sora's columns ``path,text,num_frames,height,width,aspect_ratio,fps``; any other
  column is kept in ``Record.extra`` and written back unchanged.
- JSONL, one object per line with the same keys; other keys land in ``Record.extra``.

Relative paths resolve against the manifest's own folder, so a dataset folder can move as a whole
(absolute paths baked into manifests are a common complaint). ``write_manifest`` writes paths that lie
under the manifest's folder back as relative paths and replaces the file atomically.
"""

from __future__ import annotations

import csv
import json
import os
import pathlib
from collections.abc import Iterable
from dataclasses import dataclass, field

from data.atomic import atomic_path

COLUMNS = ("path", "text", "num_frames", "height", "width", "aspect_ratio", "fps")
"""The Open-Sora column order; written first, extras follow in first-seen order."""

_REQUIRED = ("path", "num_frames", "height", "width", "fps")
"""Columns without which a record cannot be bucketed; ``text`` defaults to the empty prompt and
``aspect_ratio`` is derived from height and width when absent."""


@dataclass
class Record:
    """One training file: where it is, its caption and what ``data.video_io.probe`` found."""

    path: str
    """Absolute path once read from a manifest (relative paths are resolved on read)."""
    text: str
    """The caption; the empty string is the unconditional prompt."""
    num_frames: int
    """Frames in the file; 1 for a still image."""
    height: int
    """Frame height in pixels."""
    width: int
    """Frame width in pixels."""
    fps: float
    """Native frame rate; 1.0 for a still image."""
    aspect_ratio: float = 0.0
    """height / width, as in Open-Sora's manifests; 0.0 means "derive it from height and width"."""
    extra: dict = field(default_factory=dict)
    """Every other column, kept verbatim (strings from CSV, any JSON value from JSONL)."""

    def __post_init__(self) -> None:
        if self.num_frames < 1:
            raise ValueError(f"num_frames={self.num_frames} for {self.path}: must be >= 1")
        if self.height < 1 or self.width < 1:
            raise ValueError(f"height={self.height}, width={self.width} for {self.path}: must be >= 1")
        if self.fps <= 0:
            raise ValueError(f"fps={self.fps} for {self.path}: must be > 0")
        if self.aspect_ratio == 0.0:
            self.aspect_ratio = self.height / self.width


def read_manifest(path: str | os.PathLike) -> list[Record]:
    """Read a ``.csv`` or ``.jsonl`` manifest; relative paths resolve against its folder."""
    path = pathlib.Path(path)
    rows = _read_rows(path)
    return [
        _record_from_row(row, root=path.parent.resolve(), where=f"{path}:{i + 2}")
        for i, row in enumerate(rows)
    ]


def write_manifest(path: str | os.PathLike, records: Iterable[Record]) -> pathlib.Path:
    """Write records as CSV or JSONL (by suffix), atomically: readers see the old file or the new one."""
    path = pathlib.Path(path)
    fmt = _format_of(path)
    root = path.parent.resolve()
    rows = [_row_from_record(record, root=root) for record in records]
    with atomic_path(path) as temp, open(temp, "w", newline="", encoding="utf-8") as f:
        if fmt == "csv":
            extra_columns = list(dict.fromkeys(key for row in rows for key in row if key not in COLUMNS))
            writer = csv.DictWriter(f, fieldnames=[*COLUMNS, *extra_columns], restval="")
            writer.writeheader()
            writer.writerows(rows)
        else:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def _format_of(path: pathlib.Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in (".jsonl", ".json"):
        return "jsonl"
    raise ValueError(f"manifest {path}: suffix {suffix!r} is not supported; use .csv or .jsonl")


def _read_rows(path: pathlib.Path) -> list[dict]:
    fmt = _format_of(path)
    with open(path, newline="", encoding="utf-8") as f:
        if fmt == "csv":
            reader = csv.DictReader(f)
            missing = [column for column in _REQUIRED if column not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(
                    f"manifest {path}: missing columns {missing}; "
                    "run `python -m data.prepare FOLDER --out manifest.csv` to probe the files"
                )
            return list(reader)
        rows = []
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            missing = [key for key in _REQUIRED if key not in row]
            if missing:
                raise ValueError(f"manifest {path}:{line_number}: missing keys {missing}")
            rows.append(row)
        return rows


def _record_from_row(row: dict, *, root: pathlib.Path, where: str) -> Record:
    try:
        file_path = pathlib.Path(row["path"])
        aspect = row.get("aspect_ratio")
        return Record(
            path=str(file_path if file_path.is_absolute() else root / file_path),
            text=row.get("text") or "",
            num_frames=int(row["num_frames"]),
            height=int(row["height"]),
            width=int(row["width"]),
            fps=float(row["fps"]),
            aspect_ratio=float(aspect) if aspect not in (None, "") else 0.0,
            extra={key: value for key, value in row.items() if key not in COLUMNS},
        )
    except (TypeError, ValueError) as err:
        raise ValueError(f"manifest {where}: {err}") from err


def _row_from_record(record: Record, *, root: pathlib.Path) -> dict:
    file_path = pathlib.Path(record.path)
    if file_path.is_absolute() and file_path.is_relative_to(root):
        file_path = file_path.relative_to(root)
    clashes = [key for key in record.extra if key in COLUMNS]
    if clashes:
        raise ValueError(f"record {record.path}: extra keys {clashes} shadow manifest columns")
    return {
        "path": file_path.as_posix(),
        "text": record.text,
        "num_frames": record.num_frames,
        "height": record.height,
        "width": record.width,
        "aspect_ratio": record.aspect_ratio,
        "fps": record.fps,
        **record.extra,
    }
