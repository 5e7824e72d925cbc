"""Child processes (the Parquet export, the offline backend's spawned workers and their
resource tracker, Ray's workers) never import from the folder rekbatch is run from."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import SAMPLES
from tests.helpers import read_jsonl

# Packages a child would find first if the working folder led its sys.path: the modules a
# spawned worker and the resource tracker import by ``python -c``, what the export imports
# by ``python -m``, and the package itself.
PLANTED = ("multiprocessing", "pyarrow", "rekbatch", "numpy", "PIL")
PLANT = """\
import pathlib
pathlib.Path({marker!r}).write_text("imported from the working folder")
raise ImportError("a planted package ran")
"""


def _plant(folder: Path) -> list[Path]:
    markers = []
    for name in PLANTED:
        package = folder / name
        package.mkdir(parents=True)
        marker = folder.parent / f"IMPORTED-{name}"
        (package / "__init__.py").write_text(PLANT.format(marker=str(marker)))
        markers.append(marker)
    return markers


def test_children_do_not_import_from_the_working_folder(tmp_path: Path) -> None:
    """``rekbatch run`` as installed (the console script, whose own path starts at its
    bin folder), from a folder holding planted packages: the offline backend's workers and
    the Parquet export run, and none of the planted packages is ever imported."""
    cwd = tmp_path / "shared-folder"
    markers = _plant(cwd)
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("ric.jpg", "ric_harvey.jpeg"):
        (photos / name).write_bytes((SAMPLES / name).read_bytes())
    out = tmp_path / "out"
    config = tmp_path / "job.toml"
    config.write_text(
        f'[job]\nname = "planted"\noutput_dir = {json.dumps(str(out))}\n\n'
        f"[source]\nuris = [{json.dumps(str(photos))}]\n\n"
        '[backend]\nkind = "local"\n\n[output]\nparquet = true\n\n'
        '[[operations]]\ntype = "detect_faces"\n',
        encoding="utf-8",
    )
    script = Path(sys.executable).parent / "rekbatch"
    proc = subprocess.run(
        [str(script), "run", str(config), "--log-format", "json"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    imported = [m.name for m in markers if m.exists()]
    assert imported == [], proc.stderr[-3000:]
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_jsonl(out / "results.jsonl")
    assert sorted(r["key"] for r in rows) == ["ric.jpg", "ric_harvey.jpeg"]
    assert all(r["status"] == "ok" and r["result"]["FaceDetails"] for r in rows)
    assert (out / "results.parquet").stat().st_size > 0


def test_ray_workers_do_not_import_from_the_working_folder(tmp_path: Path) -> None:
    """``--engine ray`` from a folder holding planted packages: Ray gives its workers the
    driver's working folder first on sys.path, so the shard tasks once imported the planted
    ``rekbatch`` and failed (or ran it). Both shards run, the merge answers, nothing planted
    is imported."""
    cwd = tmp_path / "shared-folder"
    markers = _plant(cwd)
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("ric.jpg", "ric_harvey.jpeg"):
        (photos / name).write_bytes((SAMPLES / name).read_bytes())
    out = tmp_path / "out"
    config = tmp_path / "job.toml"
    config.write_text(
        f'[job]\nname = "planted-ray"\noutput_dir = {json.dumps(str(out))}\n\n'
        f"[source]\nuris = [{json.dumps(str(photos))}]\n\n"
        '[backend]\nkind = "local"\n\n[output]\nparquet = false\n\n'
        '[[operations]]\ntype = "detect_faces"\n',
        encoding="utf-8",
    )
    script = Path(sys.executable).parent / "rekbatch"
    proc = subprocess.run(
        [str(script), "run", str(config), "--engine", "ray", "--shards", "2"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    imported = [m.name for m in markers if m.exists()]
    assert imported == [], proc.stderr[-3000:]
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_jsonl(out / "results.jsonl")
    assert sorted(r["key"] for r in rows) == ["ric.jpg", "ric_harvey.jpeg"]
    assert all(r["status"] == "ok" and r["result"]["FaceDetails"] for r in rows)
