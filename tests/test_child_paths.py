"""Child processes (the Parquet export, the offline backend's spawned workers and their
resource tracker, Ray's workers) never import from the folder rekbatch is run from."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import SAMPLES
from tests.helpers import read_jsonl
from tests.support.configs import operations, toml_tables

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


def _run_planted(tmp_path: Path, name: str, parquet: bool, *flags: str) -> Path:
    """``rekbatch run`` as installed (the console script, whose own path starts at its bin
    folder) on the two Ric photos with the offline backend, from a folder holding planted
    packages; asserts that none of them was imported and the run succeeded. The output
    folder."""
    cwd = tmp_path / "shared-folder"
    markers = _plant(cwd)
    photos = tmp_path / "photos"
    photos.mkdir()
    for photo in ("ric.jpg", "ric_harvey.jpeg"):
        (photos / photo).write_bytes((SAMPLES / photo).read_bytes())
    out = tmp_path / "out"
    config = tmp_path / "job.toml"
    config.write_text(
        toml_tables(
            job={"name": name, "output_dir": out},
            source={"uris": [photos]},
            backend={"kind": "local"},
            output={"parquet": parquet},
            operations=operations("detect_faces"),
        ),
        encoding="utf-8",
    )
    script = Path(sys.executable).parent / "rekbatch"
    proc = subprocess.run(
        [str(script), "run", str(config), *flags],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    imported = [m.name for m in markers if m.exists()]
    assert imported == [], proc.stderr[-3000:]
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _assert_both_photos_answered(out: Path) -> None:
    rows = read_jsonl(out / "results.jsonl")
    assert sorted(r["key"] for r in rows) == ["ric.jpg", "ric_harvey.jpeg"]
    assert all(r["status"] == "ok" and r["result"]["FaceDetails"] for r in rows)


def test_children_do_not_import_from_the_working_folder(tmp_path: Path) -> None:
    """``rekbatch run`` as installed, from a folder holding planted packages: the offline
    backend's workers and the Parquet export run, and none of the planted packages is ever
    imported."""
    out = _run_planted(tmp_path, "planted", True, "--log-format", "json")
    _assert_both_photos_answered(out)
    assert (out / "results.parquet").stat().st_size > 0


def test_ray_workers_do_not_import_from_the_working_folder(tmp_path: Path) -> None:
    """``--engine ray`` from a folder holding planted packages: Ray gives its workers the
    driver's working folder first on sys.path, so the shard tasks once imported the planted
    ``rekbatch`` and failed (or ran it). Both shards run, the merge answers, nothing planted
    is imported."""
    out = _run_planted(tmp_path, "planted-ray", False, "--engine", "ray", "--shards", "2")
    _assert_both_photos_answered(out)
