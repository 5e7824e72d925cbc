"""Peak memory of a run over decompression bombs among ordinary photos (issue 24).

The folder: the sample photos and the files of ``tests/support/bombs.py`` (a 1-bit TIFF of
12000 x 12000 in 11 KB, 144 MP PNGs of about 150 KB in grey and palette, a GIF of 5,000
frames on an 8000 x 8000 screen, a 60 MB noisy JPEG, a truncated JPEG declaring 81 MP and
a PNG declaring 100k x 100k). ``rekbatch run`` goes over it with ``detect_faces`` under
``/usr/bin/time -v``; the figure is its "Maximum resident set size" (the largest single
process of the run's tree: the run, or one of the offline backend's workers).

Two paths: the offline backend over the local folder (``backend.kind = "local"``), and
the AWS path over a moto bucket with the fake Rekognition (each in its own process), where
the images are sent as bytes (``aws.image_mode = "bytes"``) so that conversions and reads
happen in the run. Contenders alternate per round: this version (``after``) and the
version before issue 24 (``--before``, a commit whose ``src`` is exported with
``git archive``). Medians of the rounds.

    python -m benchmarks.bench_bombs --rounds 3
    python -m benchmarks.bench_bombs --paths local --rounds 1
    python -m benchmarks.bench_bombs --paths --files     # each bomb converted alone

``--files`` also converts each bomb alone in a fresh process per contender (the growth of
its peak resident size, VmHWM reset just before). Raw results go to
benchmarks/results/bombs.json (``bombs-files.json`` for ``--files`` alone).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from tests.support.bombs import CONVERT_PEAK, write_bombs

from benchmarks.servers import REGION, bench_env, fake_rekognition, moto_s3, s3_client, src_of

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "samples" / "wheres-ric"
BEFORE = "8b1f0d6"  # main without the memory bounds of issue 24


def _folder(root: Path) -> dict[str, int]:
    sizes = write_bombs(root)
    for path in sorted(SAMPLES.iterdir()):
        shutil.copyfile(path, root / path.name)
        sizes[path.name] = path.stat().st_size
    return sizes


def _config(path: Path, out: Path, uri: str, extra: str) -> Path:
    path.write_text(
        f'[job]\nname = "bench-bombs"\noutput_dir = "{out}"\n'
        f'[source]\nuris = ["{uri}"]\n'
        f"{extra}"
        "[limits]\nconcurrency = 32\nmax_tps = 100000\n"
        '[output]\nparquet = false\n[[operations]]\ntype = "detect_faces"\n',
        encoding="utf-8",
    )
    return path


def _run(config: Path, pythonpath: str | None) -> dict[str, Any]:
    env = bench_env()
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    argv = ["/usr/bin/time", "-v", sys.executable, "-m", "rekbatch", "run", str(config)]
    proc = subprocess.run(
        [*argv, "--fresh", "--log-format", "json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tempfile.gettempdir(),  # so the installed (or exported) package is imported
        timeout=1800,
        check=False,
    )
    found = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", proc.stderr)
    seconds = None
    if wall:
        hours, minutes, secs = wall.groups()
        seconds = int(hours or 0) * 3600 + int(minutes) * 60 + float(secs)
    killed = "Command terminated by signal" in proc.stderr
    return {
        "exit": proc.returncode,
        "killed": killed,
        "peak_mb": round(int(found.group(1)) / 1024, 1) if found else None,
        "seconds": seconds,
        "stderr_tail": proc.stderr[-600:] if proc.returncode not in (0, 3) else "",
    }


def bench_files(folder: Path, contenders: dict[str, str | None]) -> dict[str, dict[str, float]]:
    """Each bomb converted alone by each contender: MiB its conversion took."""
    found: dict[str, dict[str, float]] = {}
    for path in sorted((folder / "bombs").iterdir()):
        found[path.name] = {}
        for name, pythonpath in contenders.items():
            env = bench_env()
            if pythonpath:
                env["PYTHONPATH"] = pythonpath
            # One conversion (to at most 10,000 px a side) in a fresh process; a bomb the
            # contender refuses (exit 1) counts with what it took until then.
            proc = subprocess.run(
                [sys.executable, "-c", CONVERT_PEAK, str(path), "10000"],
                capture_output=True,
                text=True,
                env=env,
                cwd=tempfile.gettempdir(),
                timeout=600,
                check=False,
            )
            if proc.returncode not in (0, 1):
                raise RuntimeError(f"{path.name}: exit {proc.returncode}: {proc.stderr[-600:]}")
            kib = int(proc.stdout.strip().splitlines()[-1])
            found[path.name][name] = round(kib / 1024, 1)
        print(path.name, found[path.name], flush=True)
    return found


def _outcomes(out: Path) -> dict[str, str]:
    path = out / "results.jsonl"
    if not path.exists():
        return {}
    found: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        status = row["status"]
        detail = row.get("reason") or row.get("error_code") or ""
        found[row["key"]] = f"{status} {detail}".strip()
    return found


def bench(
    paths: list[str], rounds: int, before: str, only_after: bool, files: bool
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        old = src_of(before, tmp / "before")
        folder = tmp / "folder"
        sizes = _folder(folder)
        contenders: dict[str, str | None] = {"after": None}
        if not only_after:
            contenders[f"before ({before})"] = str(old / "src")
        if files:
            results["one_conversion_mib"] = bench_files(folder, contenders)
        for kind in paths:
            with _services(kind, folder) as (uri, extra):
                runs: dict[str, list[dict[str, Any]]] = {name: [] for name in contenders}
                outcomes: dict[str, dict[str, str]] = {}
                for r in range(rounds):
                    order = list(contenders) if r % 2 == 0 else list(reversed(contenders))
                    for name in order:
                        out = tmp / f"out-{kind}-{len(runs[name])}-{name[:5]}"
                        config = _config(tmp / f"{kind}.toml", out, uri, extra)
                        run = _run(config, contenders[name])
                        runs[name].append(run)
                        outcomes[name] = _outcomes(out)
                        print(f"{kind} round {r + 1} {name}: {run}", flush=True)
                medians = {
                    name: statistics.median(
                        run["peak_mb"] for run in values if run["peak_mb"] is not None
                    )
                    for name, values in runs.items()
                }
                results[kind] = {
                    "runs": runs,
                    "median_peak_mb": medians,
                    "outcomes": outcomes,
                }
        results["files"] = sizes
    return results


class _services:
    """The source URI and config lines of a path, with its services up while in use."""

    def __init__(self, kind: str, folder: Path) -> None:
        self.kind = kind
        self.folder = folder
        self._stack: Any = None

    def __enter__(self) -> tuple[str, str]:
        import contextlib

        if self.kind == "local":
            return str(self.folder), '[backend]\nkind = "local"\n'
        self._stack = contextlib.ExitStack()
        s3_url = self._stack.enter_context(moto_s3())
        rek_url = self._stack.enter_context(fake_rekognition(s3_url))
        s3 = s3_client(s3_url)
        bucket = "bench-bombs"
        s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": REGION})
        for path in sorted(self.folder.rglob("*")):
            if path.is_file():
                key = path.relative_to(self.folder).as_posix()
                s3.upload_file(str(path), bucket, key)
        extra = (
            f'[aws]\nregion = "{REGION}"\nimage_mode = "bytes"\n'
            f's3_endpoint_url = "{s3_url}"\nrekognition_endpoint_url = "{rek_url}"\n'
        )
        return f"s3://{bucket}/", extra

    def __exit__(self, *exc: object) -> None:
        if self._stack is not None:
            self._stack.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--paths", nargs="*", choices=["local", "aws"], default=["local", "aws"])
    parser.add_argument("--files", action="store_true", help="also each bomb converted alone")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--before", default=BEFORE)
    parser.add_argument("--only-after", action="store_true", help="skip the old version")
    args = parser.parse_args()
    results: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_before": os.getloadavg(),
        },
        "rounds": args.rounds,
        "before": args.before,
    }
    results.update(bench(args.paths, args.rounds, args.before, args.only_after, args.files))
    results["machine"]["load_after"] = os.getloadavg()
    for kind in args.paths:
        print(kind, json.dumps(results[kind]["median_peak_mb"]), flush=True)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / ("bombs.json" if args.paths else "bombs-files.json")
    path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
