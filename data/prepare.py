"""Build a manifest from a folder or glob of media files.

    python -m data.prepare videos/ --out videos/manifest.csv
    python -m data.prepare "raw/**/*.mp4" images/ --out manifest.jsonl --captions captions.jsonl

Every file is probed in parallel (frames, fps, size; ``data.video_io.probe``) behind a progress
bar. Captions come from a sidecar ``.txt`` next to each file (``clip.mp4`` -> ``clip.txt``) or from a
JSONL map of ``{"path": ..., "text": ...}`` lines whose paths resolve against the map's folder; the
map wins where both exist. Files that cannot be read are left out of the manifest and listed with
the reason in ``<out>.errors.txt``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import pathlib
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed

from data.manifest import Record, write_manifest
from data.video_io import IMAGE_SUFFIXES, VideoReadError, probe

VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".m4v", ".gif")
MEDIA_SUFFIXES = VIDEO_SUFFIXES + IMAGE_SUFFIXES


def find_media(sources: Iterable[str]) -> list[pathlib.Path]:
    """Media files under each folder (recursively) or matching each glob, sorted and de-duplicated."""
    found = set()
    for source in sources:
        if os.path.isdir(source):
            candidates = pathlib.Path(source).rglob("*")
        else:
            candidates = (pathlib.Path(p) for p in glob.glob(source, recursive=True))
        found |= {p.resolve() for p in candidates if p.is_file() and p.suffix.lower() in MEDIA_SUFFIXES}
    return sorted(found)


def load_captions(path: str | os.PathLike) -> dict[pathlib.Path, str]:
    """A JSONL caption map: absolute file path -> caption."""
    path = pathlib.Path(path)
    root = path.parent.resolve()
    captions = {}
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            entry = json.loads(line)
            if "path" not in entry or "text" not in entry:
                raise ValueError(
                    f"{path}:{line_number}: each line needs 'path' and 'text' keys, got {sorted(entry)}"
                )
            captions[(root / entry["path"]).resolve()] = entry["text"]
    return captions


def caption_of(path: pathlib.Path, captions: dict[pathlib.Path, str]) -> str:
    """The map's caption, else the sidecar .txt, else the empty (unconditional) prompt."""
    if path in captions:
        return captions[path]
    sidecar = path.with_suffix(".txt")
    if sidecar.is_file():
        return sidecar.read_text(encoding="utf-8").strip()
    return ""


def probe_files(
    paths: Sequence[pathlib.Path],
    *,
    captions: dict[pathlib.Path, str],
    workers: int = 8,
    backend: str = "auto",
    progress: bool = True,
) -> tuple[list[Record], list[str]]:
    """Records of the readable files (in ``paths`` order) and one "path: reason" line per unreadable one."""
    from tqdm import tqdm

    def one(path: pathlib.Path) -> Record:
        info = probe(path, backend=backend)
        return Record(
            path=str(path),
            text=caption_of(path, captions),
            num_frames=info.num_frames,
            height=info.height,
            width=info.width,
            fps=info.fps,
        )

    results: dict[pathlib.Path, Record] = {}
    errors: dict[pathlib.Path, str] = {}
    # Probing is I/O and FFmpeg work that releases the GIL, so threads overlap well.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(one, path): path for path in paths}
        for future in tqdm(as_completed(futures), total=len(futures), desc="probing", disable=not progress):
            path = futures[future]
            try:
                results[path] = future.result()
            except VideoReadError as err:
                errors[path] = err.cause
    records = [results[p] for p in paths if p in results]
    return records, [f"{p}: {errors[p]}" for p in paths if p in errors]


def prepare(
    sources: Iterable[str],
    out: str | os.PathLike,
    *,
    captions: str | os.PathLike | None = None,
    workers: int = 8,
    backend: str = "auto",
    progress: bool = True,
) -> tuple[list[Record], list[str]]:
    """Probe every media file of ``sources`` and write the manifest ``out`` plus its error report."""
    out = pathlib.Path(out)
    paths = find_media(sources)
    if not paths:
        raise ValueError(f"no media files ({', '.join(MEDIA_SUFFIXES)}) found in {list(sources)}")
    caption_map = load_captions(captions) if captions is not None else {}
    records, errors = probe_files(
        paths, captions=caption_map, workers=workers, backend=backend, progress=progress
    )
    write_manifest(out, records)
    report = error_report_path(out)
    if errors:
        report.write_text("".join(line + "\n" for line in errors), encoding="utf-8")
    else:
        report.unlink(missing_ok=True)  # a stale report from an earlier run would mislead
    return records, errors


def error_report_path(manifest: str | os.PathLike) -> pathlib.Path:
    """Where ``prepare`` lists the unreadable files: ``<manifest>.errors.txt``."""
    manifest = pathlib.Path(manifest)
    return manifest.with_name(manifest.name + ".errors.txt")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m data.prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("sources", nargs="+", help="folders (searched recursively) or globs of media files")
    parser.add_argument("--out", required=True, help="manifest to write: .csv (Open-Sora columns) or .jsonl")
    parser.add_argument(
        "--captions", help='JSONL map of {"path": ..., "text": ...}; default: sidecar .txt files'
    )
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="parallel probes")
    parser.add_argument("--backend", default="auto", choices=["auto", "decord", "pyav"])
    args = parser.parse_args(argv)
    records, errors = prepare(
        args.sources, args.out, captions=args.captions, workers=args.workers, backend=args.backend
    )
    uncaptioned = sum(not record.text for record in records)
    print(f"wrote {len(records)} records to {args.out} ({uncaptioned} without a caption)")
    if errors:
        print(f"{len(errors)} unreadable files listed in {error_report_path(args.out)}")


if __name__ == "__main__":
    main()
