"""What safe outputs cost (issue 24): results.csv rows with formula cells neutralised, and
merge with every record checked against its shard.

CSV: microseconds per rendered row for ``CsvRows("neutralise")`` (the default) and
``CsvRows("raw")`` (the renderer as it was, plus one search for a carriage return), on an
ordinary row, a row with a large result (50 labels) and on a row whose key and text start
with ``=``; the contenders alternate for
``--rounds`` rounds of ``--rows`` rows each.

merge: seconds to merge two synthetic shards of ``--records`` records each, with the checks
(ownership by ``shard_of``, duplicates looked up in the ledger per batch) and with the
checks stubbed out in this process; alternating, ``--rounds`` rounds.

    python -m benchmarks.bench_safe_outputs --rows 50000 --records 50000 --rounds 5

Raw results: benchmarks/results/safe_outputs.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import timeit
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import rekbatch.sinks.merge as merge_module
from benchmarks.servers import save_report
from rekbatch.config import Config
from rekbatch.engine.shards import JOB_FILE, Shard, shard_of
from rekbatch.operations.summaries import summarize
from rekbatch.records import ObjectRef, Record
from rekbatch.sinks.merge import merge_shards, read_shard
from rekbatch.sinks.rows import CsvRows, encode_result, jsonl_line
from rekbatch.store.ledger import LedgerDB

RESULTS = Path(__file__).parent / "results" / "safe_outputs.json"
RESULT = {
    "FaceDetails": [
        {"BoundingBox": {"Left": 0.1, "Top": 0.2, "Width": 0.3, "Height": 0.4}, "Confidence": 99.1}
    ]
}
LABELS = {
    "Labels": [
        {
            "Name": f"Label {i}",
            "Confidence": 90.0 - i / 10,
            "Instances": [{"BoundingBox": {"Left": 0.1, "Top": 0.2, "Width": 0.3, "Height": 0.4}}],
            "Parents": [{"Name": "Thing"}],
        }
        for i in range(50)
    ]
}
TEXT = {"TextDetections": [{"DetectedText": '=HYPERLINK("x")', "Type": "LINE"}]}


def _record(key: str, operation: str, result: dict[str, Any]) -> Record:
    obj = ObjectRef("bench", key, 123456, "abcdef0123", "2026-01-01T00:00:00Z", None, 0)
    return Record(
        obj,
        operation,
        "ok",
        attempts=1,
        latency_ms=123.456,
        processed_at="2026-01-01T00:00:00Z",
        result=result,
    )


def bench_csv(rows: int, rounds: int) -> dict[str, Any]:
    cases = {
        "ordinary": _record("photos/2024/img_0001.jpg", "detect_faces", RESULT),
        "50 labels": _record("photos/2024/img_0002.jpg", "detect_labels", LABELS),
        "formula": _record("=cmd.jpg", "detect_text", TEXT),
    }
    out: dict[str, Any] = {}
    for case, record in cases.items():
        result_json = encode_result(record.result)
        summary = summarize(record.operation, record.result)
        renderers = {"neutralise": CsvRows("neutralise"), "raw": CsvRows("raw")}
        times: dict[str, list[float]] = {name: [] for name in renderers}
        for round_ in range(rounds):
            order = list(renderers) if round_ % 2 == 0 else list(renderers)[::-1]
            for name in order:
                row = renderers[name].row
                args = (record, "r1", "s3://bench/", summary, result_json)
                seconds = timeit.timeit(functools.partial(row, *args), number=rows)
                times[name].append(seconds / rows * 1e6)
        ratios = [n / r for n, r in zip(times["neutralise"], times["raw"], strict=True)]
        out[case] = {
            "us_per_row": times,
            "median_us_per_row": {k: round(statistics.median(v), 2) for k, v in times.items()},
            "median_ratio_neutralise_to_raw": round(statistics.median(ratios), 3),
        }
    return out


def _shards(root: Path, records: int) -> list[Path]:
    """Two finished-looking shard folders holding ``records`` records each."""
    cfg = Config.model_validate(
        {
            "job": {"name": "bench", "output_dir": str(root)},
            "source": {"uris": ["s3://bench/"]},
            "output": {"parquet": False},
            "operations": [{"type": "detect_faces"}],
        }
    )
    folders = []
    handles = {}
    for index in range(2):
        shard = Shard(index, 2)
        folder = root / shard.folder
        folder.mkdir(parents=True)
        body = {
            "shard": index,
            "shards": 2,
            "job_fingerprint": cfg.fingerprint(),
            "job_config": cfg.model_dump(mode="json"),
        }
        (folder / JOB_FILE).write_text(json.dumps(body))
        (folder / "summary.json").write_text(json.dumps({"calls": {}, "elapsed_seconds": 1.0}))
        handles[index] = (folder / "results.jsonl").open("wb")
        folders.append(folder)
    made = {0: 0, 1: 0}
    n = 0
    result_json = encode_result(RESULT)
    while min(made.values()) < records:
        key = f"photos/{n:08d}.jpg"
        n += 1
        owner = shard_of("bench", key, 2)
        if made[owner] >= records:
            continue
        made[owner] += 1
        record = _record(key, "detect_faces", RESULT)
        handles[owner].write(jsonl_line(record, "r1", "s3://bench/", result_json))
    for handle in handles.values():
        handle.close()
    return folders


# The shard being merged, for the stubbed ownership check.
_CURRENT = [0]


@contextmanager
def _checks_stubbed() -> Iterator[None]:
    """The merge as it was: every record taken as its shard's own, no duplicate lookup."""
    real_owner = getattr(merge_module, "shard_of")  # noqa: B009 - replaced below
    real_commit = getattr(merge_module, "_commit")  # noqa: B009
    real_lookup = LedgerDB.lookup

    def commit(*args: Any) -> None:
        _CURRENT[0] = args[-1].shard.index
        real_commit(*args)

    def owner(bucket: str | None, key: str, count: int) -> int:
        return _CURRENT[0]

    def lookup(self: LedgerDB, source: int, keys: list[str]) -> dict[str, dict[str, str]]:
        return {}

    setattr(merge_module, "shard_of", owner)  # noqa: B010
    setattr(merge_module, "_commit", commit)  # noqa: B010
    setattr(LedgerDB, "lookup", lookup)  # noqa: B010
    try:
        yield
    finally:
        setattr(merge_module, "shard_of", real_owner)  # noqa: B010
        setattr(merge_module, "_commit", real_commit)  # noqa: B010
        setattr(LedgerDB, "lookup", real_lookup)  # noqa: B010


def _merge(root: Path, folders: list[Path], stubbed: bool) -> float:
    out = root / "merged"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    for folder in folders:
        shutil.copytree(folder, out / folder.name)
    shards = [read_shard(Shard(i, 2), out / f.name) for i, f in enumerate(folders)]
    started = time.perf_counter()
    if stubbed:
        with _checks_stubbed():
            merge_shards(out, shards)
    else:
        merge_shards(out, shards)
    return time.perf_counter() - started


def bench_merge(records: int, rounds: int) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="bench-merge-"))
    try:
        folders = _shards(root / "src", records)
        times: dict[str, list[float]] = {"checked": [], "unchecked": []}
        for round_ in range(rounds):
            order = ["checked", "unchecked"] if round_ % 2 == 0 else ["unchecked", "checked"]
            for name in order:
                times[name].append(_merge(root, folders, stubbed=name == "unchecked"))
                print(f"round {round_} {name}: {times[name][-1]:.2f} s", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    ratios = [c / u for c, u in zip(times["checked"], times["unchecked"], strict=True)]
    return {
        "records": 2 * records,
        "seconds": times,
        "median_seconds": {k: round(statistics.median(v), 3) for k, v in times.items()},
        "median_ratio_checked_to_unchecked": round(statistics.median(ratios), 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--records", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    machine: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "load_average_before": os.getloadavg(),
    }
    csv_rows = bench_csv(args.rows, args.rounds)
    merged = bench_merge(args.records, args.rounds)
    machine["load_average_after"] = os.getloadavg()
    report = {
        "command": "python -m benchmarks.bench_safe_outputs " + " ".join(argv or sys.argv[1:]),
        "machine": machine,
        "csv": csv_rows,
        "merge": merged,
    }
    save_report(RESULTS, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
