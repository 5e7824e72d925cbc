"""results.csv from hostile names and detected text: every row readable by DuckDB, no cell
that a spreadsheet would run as a formula (unless ``output.csv_formulas = "raw"``), and the
JSONL and Parquet files keeping the exact values. Single runs, replayed tails and merges."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import duckdb
import pytest

from rekbatch.backends.base import ImageInput
from rekbatch.commands.merge import merge_job
from rekbatch.config import Config, load_config
from rekbatch.engine import Job, RunOptions
from rekbatch.engine.shards import Shard, shard_config
from rekbatch.records import ObjectRef, Record
from rekbatch.sinks.rows import CsvRows, csv_header, encode_result
from rekbatch.store.ledger import LedgerDB
from tests.helpers import read_jsonl, sized_png
from tests.support.fake_backend import FakeBackend

BOUND = 30.0
SIGN = '=HYPERLINK("http://example.invalid/x","click")'
# Every kind of cell a spreadsheet starts a formula from, a bare carriage return inside a
# key (Python's csv module leaves it unquoted), and the characters CSV quotes anyway.
HOSTILE_KEYS = [
    "cr\rinside.png",
    "=1+2.png",
    "+sum.png",
    "-minus.png",
    "@at.png",
    "\ttab.png",
    "\rcr-first.png",
    'quote"comma,newline\n.png',
    "plain.png",
]
OPS = '[[operations]]\ntype = "detect_text"\n\n[[operations]]\ntype = "detect_labels"\n'


class SignReader(FakeBackend):
    """Reads the same hostile line of text in every photo."""

    def _answer(
        self, api: str, params: dict[str, Any], images: dict[str, ImageInput], ident: str
    ) -> dict[str, Any]:
        if api == "DetectText":
            line = {"DetectedText": SIGN, "Type": "LINE", "Id": 0, "Confidence": 99.0}
            return {"TextDetections": [line], "TextModelVersion": "3.0"}
        return super()._answer(api, params, images, ident)


def _folder(root: Path) -> Path:
    folder = root / "photos"
    folder.mkdir()
    for i, key in enumerate(HOSTILE_KEYS):
        (folder / key).write_bytes(sized_png(i))
    return folder


def _config(tmp_path: Path, folder: Path, formulas: str | None) -> Config:
    output = f'[output]\ncsv_formulas = "{formulas}"\n' if formulas else ""
    path = tmp_path / "job.toml"
    path.write_text(
        f'[job]\nname = "hostile"\noutput_dir = {json.dumps(str(tmp_path / "out"))}\n\n'
        f"[source]\nuris = [{json.dumps(str(folder))}]\n\n"
        f"[limits]\nmax_tps = 10000\n\n{output}\n{OPS}",
        encoding="utf-8",
    )
    return load_config(path, environ={})


async def _run(cfg: Config, options: RunOptions) -> int:
    async with asyncio.timeout(BOUND):
        outcome = await Job(cfg, options, backend=SignReader()).run()
    return outcome.exit_code


def _csv_rows(path: Path) -> list[dict[str, Any]]:
    """results.csv as a user loads it: DuckDB's read_csv with nothing but the path."""
    con = duckdb.connect()
    try:
        cursor = con.execute(f"SELECT * FROM read_csv('{path}', all_varchar = true)")
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
    finally:
        con.close()


def _parquet_keys(out: Path) -> list[str]:
    con = duckdb.connect()
    try:
        query = f"SELECT key FROM read_parquet('{out}/results.parquet')"
        return [r[0] for r in con.execute(query).fetchall()]
    finally:
        con.close()


def _neutralised(value: str) -> str:
    return "'" + value if value[:1] in ("=", "+", "-", "@", "\t", "\r") else value


def _check(out: Path, *, raw: bool) -> None:
    lines = read_jsonl(out / "results.jsonl")
    expected = {(key, op) for key in HOSTILE_KEYS for op in ("detect_text", "detect_labels")}
    # JSONL and Parquet: the exact values, whatever the CSV does.
    assert sorted((r["key"], r["operation"]) for r in lines) == sorted(expected)
    assert sorted(_parquet_keys(out)) == sorted(r["key"] for r in lines)
    text_lines = [r for r in lines if r["operation"] == "detect_text"]
    texts = {r["result"]["TextDetections"][0]["DetectedText"] for r in text_lines}
    assert texts == {SIGN}
    # CSV: every row read back, each once, keys and text neutralised unless raw.
    rows = _csv_rows(out / "results.csv")
    shown = (lambda v: v) if raw else _neutralised
    assert sorted((r["key"], r["operation"]) for r in rows) == sorted(
        (shown(key), op) for key, op in expected
    )
    for row in rows:
        assert row["status"] == "ok"
        if row["operation"] == "detect_text":
            assert row["text"] == (SIGN if raw else "'" + SIGN)
            # result_json is JSON (starts with "{"), kept exact in every mode.
            assert json.loads(row["result_json"])["TextDetections"][0]["DetectedText"] == SIGN
    db = LedgerDB(out / ".rekbatch" / "ledger.sqlite", readonly=True)
    try:
        assert sum(r["n"] for r in db.counts()) == len(expected)
    finally:
        db.close()


@pytest.mark.parametrize("formulas", [None, "neutralise", "raw"])
def test_hostile_keys_and_text_load_in_duckdb(tmp_path: Path, formulas: str | None) -> None:
    cfg = _config(tmp_path, _folder(tmp_path), formulas)
    out = tmp_path / "out"
    assert asyncio.run(_run(cfg, RunOptions(output_dir=out))) == 0
    _check(out, raw=formulas == "raw")


def test_a_replayed_tail_and_a_merge_render_the_same_safe_csv(tmp_path: Path) -> None:
    """The rows a crashed run replays from results.jsonl, and the rows merge renders from
    the shards, go through the same quoting and neutralising as rows written live."""
    cfg = _config(tmp_path, _folder(tmp_path), None)
    out = tmp_path / "out"
    for index in range(2):
        shard = Shard(index, 2)
        own = shard_config(cfg, shard)
        options = RunOptions(output_dir=Path(own.job.output_dir), shard=shard, job_config=cfg)
        assert asyncio.run(_run(own, options)) == 0
    merge_job(str(out), None)
    _check(out, raw=False)

    # A crash between the JSONL append and the commit: the ledger knows only the header
    # and no rows, so the next open replays every line into the CSV.
    single = tmp_path / "single"
    solo = cfg.model_copy(update={"job": cfg.job.model_copy(update={"output_dir": str(single)})})
    assert asyncio.run(_run(solo, RunOptions(output_dir=single))) == 0
    db = LedgerDB(single / ".rekbatch" / "ledger.sqlite")
    try:
        db.connection.execute("DELETE FROM records")
        db.set_meta(
            {"sink_sizes": json.dumps({"results.jsonl": 0, "results.csv": len(csv_header())})}
        )
        db.connection.commit()
    finally:
        db.close()
    assert asyncio.run(_run(solo, RunOptions(output_dir=single))) == 0
    _check(single, raw=False)


def test_a_row_with_a_bare_carriage_return_is_quoted() -> None:
    """The unit under the DuckDB tests: one rendered row, with its length as the ledger
    keeps it (the writer's offsets follow from each row's bytes)."""
    obj = ObjectRef("bkt", "a\rb", 1000, "etag", "2026-01-01T00:00:00Z")
    record = Record(obj, "detect_text", "ok", attempts=1, processed_at="t", result={})
    line = CsvRows().row(record, "r1", "s3://b/", {"text": "=1"}, encode_result({}))
    assert b'"a\rb"' in line and b",'=1," in line
    assert line.count(b"\n") == 1 and line.endswith(b"\n")
    raw = CsvRows("raw").row(record, "r1", "s3://b/", {"text": "=1"}, encode_result({}))
    assert b",=1," in raw and b'"a\rb"' in raw
