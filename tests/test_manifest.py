"""Manifests: CSV and JSONL round trips, extra columns, relative paths, Open-Sora compatibility."""

import csv
import json
import pathlib

import pytest

from data.manifest import COLUMNS, Record, read_manifest, write_manifest


def make_records(root):
    return [
        Record(
            path=str(root / "clips" / "a.mp4"),
            text='a red square, "moving" left, then right',
            num_frames=51,
            height=720,
            width=1280,
            fps=29.97,
            extra={"aes": "5.5", "source": "synthetic"},
        ),
        Record(
            path="/elsewhere/b.png",
            text="",
            num_frames=1,
            height=64,
            width=48,
            fps=1.0,
            extra={"aes": "4", "source": ""},
        ),
    ]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_round_trip_keeps_every_field_and_extra_column(tmp_path, suffix):
    records = make_records(tmp_path)
    path = write_manifest(tmp_path / f"manifest{suffix}", records)
    assert read_manifest(path) == records
    assert records[0].aspect_ratio == pytest.approx(720 / 1280)  # derived as height / width


def test_csv_has_open_sora_columns_first_and_relative_paths_inside_its_folder(tmp_path):
    path = write_manifest(tmp_path / "m.csv", make_records(tmp_path))
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
        header = list(rows[0])
    assert header[: len(COLUMNS)] == list(COLUMNS) and header[len(COLUMNS) :] == ["aes", "source"]
    assert rows[0]["path"] == "clips/a.mp4"  # the dataset folder can move with its manifest
    assert rows[1]["path"] == "/elsewhere/b.png"


def test_relative_paths_resolve_against_the_manifest_folder_not_the_cwd(tmp_path, monkeypatch):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "m.jsonl").write_text(
        json.dumps({"path": "x/c.mp4", "text": "t", "num_frames": 17, "height": 64, "width": 64, "fps": 16})
        + "\n"
    )
    monkeypatch.chdir(tmp_path)
    [record] = read_manifest("data/m.jsonl")
    assert record.path == str(folder.resolve() / "x" / "c.mp4")
    assert record.aspect_ratio == 1.0 and record.extra == {}


def test_a_minimal_open_sora_csv_without_aspect_ratio_reads(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("path,text,num_frames,height,width,fps,id\nv.mp4,hello,33,90,160,24,7\n")
    [record] = read_manifest(path)
    assert (record.num_frames, record.height, record.width, record.fps) == (33, 90, 160, 24.0)
    assert record.aspect_ratio == pytest.approx(90 / 160) and record.extra == {"id": "7"}


def test_missing_columns_name_the_columns_and_the_fix(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("path,text\nv.mp4,hello\n")
    with pytest.raises(
        ValueError, match=r"missing columns \['num_frames', 'height', 'width', 'fps'\].*data.prepare"
    ):
        read_manifest(path)


def test_bad_value_names_the_line(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("path,text,num_frames,height,width,fps\nv.mp4,,17,64,64,16\nw.mp4,,many,64,64,16\n")
    with pytest.raises(ValueError, match=r"m.csv:3"):
        read_manifest(path)


def test_write_is_atomic_a_failed_write_keeps_the_old_file(tmp_path):
    path = write_manifest(tmp_path / "m.jsonl", make_records(tmp_path))
    before = path.read_text()
    unserialisable = Record(
        path="x.mp4", text="", num_frames=1, height=8, width=8, fps=1.0, extra={"k": object()}
    )
    with pytest.raises(TypeError):  # fails half-way through writing the temporary file
        write_manifest(path, [*make_records(tmp_path), unserialisable])
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.jsonl"]  # no temporary file left behind


def test_extra_keys_may_not_shadow_columns(tmp_path):
    clashing = Record(path="x.mp4", text="", num_frames=1, height=8, width=8, fps=1.0, extra={"fps": "3"})
    with pytest.raises(ValueError, match=r"extra keys \['fps'\] shadow"):
        write_manifest(tmp_path / "m.csv", [clashing])


# ----------------------------------------------------------------------------- python -m data.prepare


def test_prepare_probes_captions_and_reports_unreadable_files(tmp_path, capsys):
    import torch

    from data.prepare import error_report_path, main
    from data.video_io import write_video

    folder = tmp_path / "raw"
    write_video(folder / "a.mp4", torch.zeros(3, 9, 32, 48), fps=24.0)
    write_video(folder / "sub" / "b.mp4", torch.zeros(3, 5, 16, 16), fps=12.0)
    write_video(folder / "c.png", torch.zeros(3, 1, 20, 10))
    (folder / "a.txt").write_text("from the sidecar\n")
    (folder / "sub" / "b.txt").write_text("sidecar that the map overrides")
    (folder / "broken.mp4").write_bytes(b"not a video at all")
    (folder / "notes.md").write_text("not media: ignored")
    (tmp_path / "captions.jsonl").write_text(
        json.dumps({"path": "raw/sub/b.mp4", "text": "from the map"}) + "\n"
    )
    out = folder / "manifest.csv"

    main([str(folder), "--out", str(out), "--captions", str(tmp_path / "captions.jsonl"), "--workers", "2"])

    records = {pathlib.Path(r.path).name: r for r in read_manifest(out)}
    assert set(records) == {"a.mp4", "b.mp4", "c.png"}
    a, b, c = records["a.mp4"], records["b.mp4"], records["c.png"]
    assert (a.num_frames, a.height, a.width, a.fps, a.text) == (9, 32, 48, 24.0, "from the sidecar")
    assert (b.num_frames, b.height, b.width, b.fps, b.text) == (5, 16, 16, 12.0, "from the map")
    assert (c.num_frames, c.height, c.width, c.text) == (1, 20, 10, "")
    report = error_report_path(out).read_text().splitlines()
    assert len(report) == 1 and report[0].startswith(str(folder.resolve() / "broken.mp4") + ": ")
    assert "wrote 3 records" in capsys.readouterr().out
    assert "sub/b.mp4" in out.read_text()  # stored relative to the manifest

    # A glob picks a subset; with no unreadable file the stale report goes away.
    main([str(folder / "*.png"), "--out", str(out)])
    assert [pathlib.Path(r.path).name for r in read_manifest(out)] == ["c.png"]
    assert not error_report_path(out).exists()
