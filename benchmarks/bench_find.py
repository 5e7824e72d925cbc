"""Benchmark ``rekbatch find`` offline over a large face index (issue 27).

The generator builds an offline ``index_faces`` job of ``--faces`` stored faces (default
1,000,000; four per image) through the offline store's own ``CollectionStore.append`` and the
ledger's own ``commit``, so find reads what a run would have written. The embeddings are
synthetic: the reference photo's real embedding (``samples/wheres-ric/ric_harvey.jpeg``,
analysed with the offline models) plus

- ``--planted`` faces at distance 0.05-0.58 from it (similarity 99.9-81.6: matches at the
  default threshold of 80), each in a photo of its own;
- as many decoys at distance 0.62-0.70 (similarity 76-60: just not matches);
- the rest at a stranger's distance (0.95 on average, none closer than 0.72).

Then, alternating, each in a fresh process pinned to one core with one BLAS thread:

- ``find``: what the command does after its start-up (imports): open the job, load the
  offline face models, analyse the reference, scan the index, map the matches to photos and
  write ``find/NAME.jsonl``; per step times, the recall of the planted photos and any decoy
  found, and the process's peak RSS;
- ``read``: the file read with ``read()`` into one chunk-sized buffer and nothing computed:
  what a scan that copies the file in (as the first version did) could not go below. The
  scan maps the file instead and computes straight from the page cache.

And the whole command (``python -m rekbatch find JOB --person planted=REF``) as a
subprocess on the same core: its wall time and peak RSS.

    python benchmarks/bench_find.py [--faces 1000000] [--planted 100] [--runs 5]
        [--command-runs 3] [--job /tmp/rekbatch-bench-find] [--cpu 0]

Prints a markdown table and writes ``benchmarks/results/find.json`` (or ``--output``). The
generated job is kept in ``--job`` and reused when its parameters match.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
REFERENCE = REPO / "samples" / "wheres-ric" / "ric_harvey.jpeg"
RESULTS = HERE / "results" / "find.json"
FACES_PER_IMAGE = 4
COLLECTION = "bench-index"
BATCH = 20_000
THREADS = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

sys.path.insert(0, str(REPO / "src"))


# -- the generator ----------------------------------------------------------------------------


def _unit_rows(rng: Any, count: int) -> Any:
    import numpy as np

    rows = rng.normal(size=(count, 128))
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def generate(job: Path, faces: int, planted: int, seed: int) -> dict[str, Any]:
    """Build the job in ``job``; its description (also ``job/bench.json``)."""
    import numpy as np

    from rekbatch.backends.local import faces as local_faces
    from rekbatch.backends.local.collections import CollectionStore, StoredFace
    from rekbatch.config import Config
    from rekbatch.operations.search_faces import external_image_id
    from rekbatch.records import utc_now
    from rekbatch.store import jobdir
    from rekbatch.store.ledger import RECORD_COLUMNS, LedgerDB

    started = time.perf_counter()
    photos = job / "photos"  # named as the source; never created: find must not need it
    cfg = Config.model_validate(
        {
            "job": {"name": "bench-find", "output_dir": str(job)},
            "source": {"uris": [str(photos)]},
            "backend": {"kind": "local"},
            "operations": [{"type": "index_faces", "collection_id": COLLECTION}],
            "output": {"parquet": False},
        }
    )
    job.mkdir(parents=True, exist_ok=True)
    jobdir.claim(job, cfg, fresh=True, config_path="")
    _, reference = local_faces.reference_face(REFERENCE.read_bytes())
    query = np.asarray(reference, dtype=np.float64)
    rng = np.random.default_rng(seed)
    images = faces // FACES_PER_IMAGE
    # Planted matches and decoys each in a photo of their own: "found in N" counts photos.
    chosen = rng.choice(images, size=2 * planted, replace=False)
    special_rows = chosen * FACES_PER_IMAGE + rng.integers(0, FACES_PER_IMAGE, size=2 * planted)
    distances = np.concatenate(
        [rng.uniform(0.05, 0.58, size=planted), rng.uniform(0.62, 0.70, size=planted)]
    )
    special = dict(zip(special_rows.tolist(), distances.tolist(), strict=True))
    store = CollectionStore(jobdir.state_dir(job) / "collections")
    store.create(COLLECTION)
    key_of = [f"img/{i:07d}.jpg" for i in range(images)]
    for start in range(0, faces, BATCH):
        count = min(BATCH, faces - start)
        # Strangers: about 0.95 away (a chi distribution), redrawn when closer than 0.72.
        rows = query + rng.normal(scale=0.95 / np.sqrt(128), size=(count, 128))
        close = np.linalg.norm(rows - query, axis=1) < 0.72
        while close.any():
            rows[close] = query + rng.normal(scale=0.95 / np.sqrt(128), size=(close.sum(), 128))
            close = np.linalg.norm(rows - query, axis=1) < 0.72
        for row in range(start, start + count):
            if row in special:
                rows[row - start] = query + _unit_rows(rng, 1)[0] * special[row]
        batch = [
            StoredFace(
                face_id=f"{i:08x}-0000-4000-8000-{i:012x}",
                image_id=f"image-{i // FACES_PER_IMAGE}",
                external_image_id=external_image_id(None, key_of[i // FACES_PER_IMAGE]),
                box={"Width": 0.1, "Height": 0.12, "Left": 0.2 * (i % 4), "Top": 0.3},
                confidence=99.0,
                embedding=vector,
            )
            for i, vector in zip(range(start, start + count), rows.tolist(), strict=True)
        ]
        store.append(COLLECTION, batch)
    db = LedgerDB(jobdir.ledger_path(job), durable=False)
    try:
        now = utc_now()
        template = dict.fromkeys(RECORD_COLUMNS)
        for start in range(0, images, 50_000):
            ledger_rows = []
            for image in range(start, min(images, start + 50_000)):
                values = {
                    **template,
                    "source": 0,
                    "key": key_of[image],
                    "operation": "index_faces",
                    "etag": f"etag-{image}",
                    "size": 100_000,
                    "status": "ok",
                    "attempts": 1,
                    "billed": 1,
                    "face_count": FACES_PER_IMAGE,
                    "detail": f"{COLLECTION}/{external_image_id(None, key_of[image])}",
                    "processed_at": now,
                }
                ledger_rows.append(tuple(values[c] for c in RECORD_COLUMNS))
            db.commit(ledger_rows, {}, {}, {0: len(ledger_rows)}, [])
        db.commit([], {}, {}, {}, [0])
    finally:
        db.close()
    matches = sorted(key_of[r // FACES_PER_IMAGE] for r, d in special.items() if d < 0.6)
    decoys = sorted(key_of[r // FACES_PER_IMAGE] for r, d in special.items() if d > 0.6)
    description = {
        "faces": faces,
        "planted": planted,
        "seed": seed,
        "images": images,
        "planted_keys": matches,
        "decoy_keys": decoys,
        "embeddings_bytes": (store.root / COLLECTION / "embeddings.f32").stat().st_size,
        "generated_seconds": round(time.perf_counter() - started, 1),
    }
    (job / "bench.json").write_text(json.dumps(description, indent=1), encoding="utf-8")
    return description


# -- the measured children --------------------------------------------------------------------


def _pin(cpu: int) -> None:
    os.sched_setaffinity(0, {cpu})


def peak_rss_mib() -> float:
    """This process's peak resident memory since it started its program (VmHWM: unlike
    ``ru_maxrss``, not carried over from the parent that forked it)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# The whole command as ``python -m rekbatch`` runs it, telling its peak memory at exit.
COMMAND = """
import atexit, sys
sys.path.insert(0, {bench!r})
from bench_find import peak_rss_mib
atexit.register(lambda: sys.stderr.write(f"PEAK_RSS_MIB {{peak_rss_mib()}}\\n"))
from rekbatch.cli import main
sys.argv = ["rekbatch", *sys.argv[1:]]
main()
"""


def child_find(job: Path) -> dict[str, Any]:
    """The command's work after its imports, step by step."""
    steps: dict[str, float] = {}
    cpu: dict[str, float] = {}
    mark = time.perf_counter()
    cpu_mark = time.process_time()

    def step(name: str) -> None:
        nonlocal mark, cpu_mark
        now, cpu_now = time.perf_counter(), time.process_time()
        steps[name], cpu[name] = now - mark, cpu_now - cpu_mark
        mark, cpu_mark = now, cpu_now

    from rekbatch.backends.local import faces as local_faces
    from rekbatch.commands import find

    step("imports")
    indexed = find.open_indexed_job(job)
    step("open_job")
    local_faces.warm_up()
    step("load_models")
    person = find.Person("planted", str(REFERENCE))
    references = {person.reference: REFERENCE.read_bytes()}
    _, embedding = local_faces.reference_face(references[person.reference])
    step("analyse_reference")
    resolver = find.Resolver(job)
    found = find.search_offline(indexed, embedding, 80.0, resolver)
    resolver.close()
    step("scan_and_map")
    answer = find.Answer(person, 80.0, indexed.images, found)
    find.write_answers(indexed, [answer])
    step("write_answer")
    return {
        "steps": steps,
        "cpu": cpu,
        "keys": sorted(f.key for f in found),
        "line": answer.line(),
        "peak_rss_mib": peak_rss_mib(),
    }


def child_read(job: Path) -> dict[str, Any]:
    """Reading the embeddings file with read() into a chunk-sized buffer, nothing else."""
    import numpy as np

    from rekbatch.backends.local import collections as store

    path = job / ".rekbatch" / "collections" / COLLECTION / store.EMBEDDINGS_FILE
    started, cpu = time.perf_counter(), time.process_time()
    buffer = np.empty((store.CHUNK_ROWS, store.ROW_FLOATS), dtype=np.float32)
    view = buffer.data.cast("B")
    total = 0
    with path.open("rb", buffering=0) as fh:
        while got := fh.readinto(view):
            total += got
    return {
        "seconds": time.perf_counter() - started,
        "cpu_seconds": time.process_time() - cpu,
        "bytes": total,
        "peak_rss_mib": peak_rss_mib(),
    }


def run_child(mode: str, job: Path, cpu: int) -> dict[str, Any]:
    env = {**os.environ, **THREADS}
    proc = subprocess.run(
        [sys.executable, __file__, "--child", mode, "--job", str(job), "--cpu", str(cpu)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} child failed: {proc.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.splitlines()[-1])
    return result


def run_command(job: Path, cpu: int) -> dict[str, Any]:
    """``rekbatch find`` as a user runs it, on one core: wall time and peak RSS."""
    env = {**os.environ, **THREADS, "PYTHONPATH": str(REPO / "src")}
    code = COMMAND.format(bench=str(HERE))
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", code, "find", str(job), "--person", f"planted={REFERENCE}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
        preexec_fn=lambda: _pin(cpu),  # only sets the child's affinity
    )
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"rekbatch find failed: {proc.stderr[-2000:]}")
    peak = next(
        float(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("PEAK_RSS")
    )
    return {"seconds": wall, "peak_rss_mib": peak, "stdout": proc.stdout.strip()}


# -- main -------------------------------------------------------------------------------------


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faces", type=int, default=1_000_000)
    parser.add_argument("--planted", type=int, default=100)
    parser.add_argument("--seed", type=int, default=27)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--command-runs", type=int, default=3)
    parser.add_argument("--job", type=Path, default=Path("/tmp/rekbatch-bench-find"))
    parser.add_argument("--cpu", type=int, default=0)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--child", choices=["find", "read"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _pin(args.cpu)
        result = child_find(args.job) if args.child == "find" else child_read(args.job)
        print(json.dumps(result))
        return 0

    described = args.job / "bench.json"
    wanted = {"faces": args.faces, "planted": args.planted, "seed": args.seed}
    bench: dict[str, Any] | None = None
    if described.exists():
        bench = json.loads(described.read_text())
        if {k: bench.get(k) for k in wanted} != wanted:
            bench = None
    if bench is None:
        print(f"generating {args.faces:,} faces in {args.job} ...", file=sys.stderr)
        bench = generate(args.job, args.faces, args.planted, args.seed)
    planted, decoys = set(bench["planted_keys"]), set(bench["decoy_keys"])

    finds: list[dict[str, Any]] = []
    reads: list[dict[str, Any]] = []
    for run in range(args.runs):
        order = ("find", "read") if run % 2 == 0 else ("read", "find")
        for mode in order:
            result = run_child(mode, args.job, args.cpu)
            (finds if mode == "find" else reads).append(result)
            print(f"run {run + 1} {mode}: {json.dumps(result)[:300]}", file=sys.stderr)
    commands = [run_command(args.job, args.cpu) for _ in range(args.command_runs)]

    keys = [set(f["keys"]) for f in finds]
    recall = min(len(k & planted) / len(planted) for k in keys)
    decoys_found = max(len(k & decoys) for k in keys)
    strangers_found = max(len(k - planted - decoys) for k in keys)
    step_names = list(finds[0]["steps"])
    steps = {name: _median([f["steps"][name] for f in finds]) for name in step_names}
    answer_seconds = _median(
        [sum(f["steps"][n] for n in step_names if n != "imports") for f in finds]
    )
    search_seconds = _median(
        [f["steps"]["scan_and_map"] + f["steps"]["write_answer"] for f in finds]
    )
    read_seconds = _median([r["seconds"] for r in reads])
    cpu_steps = {name: _median([f["cpu"][name] for f in finds]) for name in step_names}
    search_cpu = _median([f["cpu"]["scan_and_map"] + f["cpu"]["write_answer"] for f in finds])
    read_cpu = _median([r["cpu_seconds"] for r in reads])
    summary = {
        "date": time.strftime("%Y-%m-%d"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
        "generator": bench,
        "runs": args.runs,
        "cpu": args.cpu,
        "find_steps_median_seconds": steps,
        "find_steps_median_cpu_seconds": cpu_steps,
        "search_median_cpu_seconds": search_cpu,
        "read_floor_median_cpu_seconds": read_cpu,
        "search_median_seconds": search_seconds,
        "after_startup_median_seconds": answer_seconds,
        "read_floor_median_seconds": read_seconds,
        "search_over_read": round(search_seconds / read_seconds, 2),
        "find_peak_rss_mib_max": round(max(f["peak_rss_mib"] for f in finds), 1),
        "read_peak_rss_mib_max": round(max(r["peak_rss_mib"] for r in reads), 1),
        "recall_min": recall,
        "decoys_found_max": decoys_found,
        "strangers_found_max": strangers_found,
        "command_median_seconds": _median([c["seconds"] for c in commands]),
        "command_peak_rss_mib_max": round(max(c["peak_rss_mib"] for c in commands), 1),
        "command_stdout": commands[0]["stdout"] if commands else None,
        "raw": {"find": finds, "read": reads, "command": commands},
    }
    for f in summary["raw"]["find"]:
        f["keys"] = len(f["keys"])
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")

    print(f"{bench['faces']:,} faces, {len(planted)} planted, {args.runs} runs, cpu {args.cpu}")
    print("| step | median wall s | median CPU s |\n|---|---|---|")
    for name, value in steps.items():
        print(f"| {name} | {value:.3f} | {cpu_steps[name]:.3f} |")
    print(f"| search (scan, map, write) | {search_seconds:.3f} | {search_cpu:.3f} |")
    print(f"| after start-up (all but imports) | {answer_seconds:.3f} | |")
    print(f"| read floor (read() into one buffer) | {read_seconds:.3f} | {read_cpu:.3f} |")
    print(f"| whole command `rekbatch find` | {summary['command_median_seconds']:.3f} | |")
    print(
        f"\nrecall {recall:.0%}, decoys found {decoys_found}, strangers found {strangers_found}; "
        f"peak RSS find {summary['find_peak_rss_mib_max']} MiB, command "
        f"{summary['command_peak_rss_mib_max']} MiB, read {summary['read_peak_rss_mib_max']} MiB"
    )
    print(f"command said: {summary['command_stdout']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
