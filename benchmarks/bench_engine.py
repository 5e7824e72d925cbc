"""Engine benchmark (issue 10): peak memory and whole-process throughput of ``rekbatch run``.

rekbatch is driven only through its CLI (``python -m rekbatch run CONFIG --log-format json``),
so the same script measures the engine before and after a rewrite. The job is one
``detect_labels`` operation, ``sniff = false``, ``image_mode = "s3"``, concurrency 64,
``max_tps = 100000``; the fake Rekognition has no latency and no quota.

1. memory: peak RSS of the whole ``rekbatch run`` process (``/usr/bin/time -v``, else
   ``wait4``'s rusage) over buckets of each ``--sizes``. The buckets are served by
   ``benchmarks.synthetic_s3`` (keys made from an index, nothing stored); the fake answers
   S3Object images without fetching them (``benchmarks.fake_synthetic``) when it can.
2. throughput: calls per second from spawn to exit, rekbatch against a bare aiobotocore loop
   (``benchmarks.bare_loop``, also its own process), ``--images`` objects, alternating the
   contenders for ``--rounds`` rounds; the fake keeps the objects in memory (``--s3-cache``,
   warmed before timing) and its stats are reset before each run.

    python -m benchmarks.bench_engine                                  # both, every size
    python -m benchmarks.bench_engine --only memory --sizes 20000,100000
    python -m benchmarks.bench_engine --only throughput --rounds 5
    python -m benchmarks.bench_engine --only throughput --label no-parquet \\
        --rekbatch-env SOME_SETTING=1 --output-setting 'parquet = false'

Raw results go to benchmarks/results/engine.json (engine-LABEL.json with --label); a run
replaces only the sections it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.servers import (
    REGION,
    RunningServer,
    bench_env,
    fake_admin,
    synthetic_s3,
    url_server,
)

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parent.parent
TIME_BIN = "/usr/bin/time"
MEMORY_TARGET_MB = 200.0
MEMORY_RATIO_TARGET = 1.15
THROUGHPUT_RATIO_TARGET = 0.9
SAMPLE_SECONDS = 0.5
MAX_EVENTS = 200
MAX_SAMPLES_KEPT = 300  # RSS samples written per run


# --------------------------------------------------------------------------- one process


@dataclasses.dataclass
class ProcessRun:
    """One benchmarked process: wall time from spawn to exit and what the kernel counted."""

    label: str
    exit_code: int
    wall_seconds: float
    max_rss_kb: int
    user_seconds: float
    system_seconds: float
    #: (seconds since spawn, RSS in KiB) every SAMPLE_SECONDS, from /proc
    samples: list[tuple[float, int]]
    #: (seconds since spawn, JSON log event) as the lines appeared on stderr
    events: list[tuple[float, str]]
    stdout: str
    stderr_tail: str

    @property
    def max_rss_mb(self) -> float:
        return self.max_rss_kb / 1024.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "exit_code": self.exit_code,
            "wall_seconds": round(self.wall_seconds, 3),
            "max_rss_mb": round(self.max_rss_mb, 1),
            "user_seconds": round(self.user_seconds, 2),
            "system_seconds": round(self.system_seconds, 2),
        }


def _time_fields(path: Path) -> dict[str, str]:
    fields: dict[str, str] = {}
    with contextlib.suppress(FileNotFoundError):
        for line in path.read_text(errors="replace").splitlines():
            name, sep, value = line.strip().rpartition(": ")
            if sep:
                fields[name] = value
    return fields


def _child_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as handle:
            children = handle.read().split()
    except OSError:
        return None
    return int(children[0]) if children else None


def _rss_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


class _EventReader:
    """The ``event`` of each whole JSON line appended to a log file, as it grows, timed by
    the line's own ISO ``timestamp`` when it has one, else by when it was read."""

    def __init__(self, path: Path, since: float, since_wall: float) -> None:
        self._handle = open(path, "rb")  # noqa: SIM115 - closed by close()
        self._partial = b""
        self._since = since
        self._since_wall = since_wall
        self.events: list[tuple[float, str]] = []

    def _when(self, line: dict[str, Any]) -> float:
        stamp = line.get("timestamp")
        if isinstance(stamp, str):
            with contextlib.suppress(ValueError):
                moment = datetime.datetime.fromisoformat(stamp)
                if moment.tzinfo is not None:
                    return round(moment.timestamp() - self._since_wall, 3)
        return round(time.monotonic() - self._since, 3)

    def poll(self) -> None:
        data = self._partial + self._handle.read()
        *lines, self._partial = data.split(b"\n")
        for raw in lines:
            if len(self.events) >= MAX_EVENTS:
                return
            with contextlib.suppress(ValueError):
                line = json.loads(raw)
                if isinstance(line, dict) and isinstance(line.get("event"), str):
                    self.events.append((self._when(line), line["event"]))

    def close(self) -> None:
        self._handle.close()


def _sample(
    proc_pid: int,
    use_time: bool,
    started: float,
    reader: _EventReader,
    samples: list[tuple[float, int]],
    stop: threading.Event,
) -> None:
    """Every SAMPLE_SECONDS until ``stop``: the measured process's RSS and new log lines."""
    target: int | None = None if use_time else proc_pid
    while not stop.wait(SAMPLE_SECONDS):
        if target is None:
            target = _child_of(proc_pid)  # /usr/bin/time's child: the measured process
        rss = _rss_kb(target) if target is not None else None
        if rss is not None:
            samples.append((round(time.monotonic() - started, 2), rss))
        reader.poll()


def timed_process(
    argv: list[str], *, env: dict[str, str], timeout: float, log_dir: Path, label: str
) -> ProcessRun:
    """Run ``argv`` under ``/usr/bin/time -v`` (or wait4 without it) and wait for it, while
    a thread samples its RSS and reads its JSON log lines; past ``timeout`` its process group
    is killed. Wall time is from spawn to the parent's wait4 returning."""
    use_time = os.access(TIME_BIN, os.X_OK)
    time_file = log_dir / f"{label}.time"
    out_path, err_path = log_dir / f"{label}.stdout", log_dir / f"{label}.stderr"
    command = [TIME_BIN, "-v", "-o", str(time_file), *argv] if use_time else argv
    samples: list[tuple[float, int]] = []
    timed_out = threading.Event()
    stop = threading.Event()
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        started, started_wall = time.monotonic(), time.time()
        proc = subprocess.Popen(
            command, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True,
        )  # fmt: skip
        reader = _EventReader(err_path, started, started_wall)

        def kill() -> None:
            timed_out.set()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

        timer = threading.Timer(timeout, kill)
        sampler = threading.Thread(
            target=_sample, args=(proc.pid, use_time, started, reader, samples, stop), daemon=True
        )
        timer.start()
        sampler.start()
        try:
            _, status, rusage = os.wait4(proc.pid, 0)
            wall = time.monotonic() - started
        except BaseException:  # interrupted: leave nothing running
            kill()
            os.wait4(proc.pid, 0)
            raise
        finally:
            proc.returncode = 0  # reaped here with wait4: keep Popen from waiting again
            timer.cancel()
            stop.set()
            sampler.join(timeout=10)
            reader.poll()
            reader.close()
    if timed_out.is_set():
        raise TimeoutError(f"{label}: still running after {timeout:.0f} s, killed")
    exit_code = os.waitstatus_to_exitcode(status)
    if use_time:
        fields = _time_fields(time_file)
        max_rss = int(fields.get("Maximum resident set size (kbytes)", "0"))
        user = float(fields.get("User time (seconds)", "0"))
        system = float(fields.get("System time (seconds)", "0"))
        exit_code = int(fields.get("Exit status", str(exit_code)))
    else:
        max_rss, user, system = rusage.ru_maxrss, rusage.ru_utime, rusage.ru_stime
    return ProcessRun(
        label=label,
        exit_code=exit_code,
        wall_seconds=wall,
        max_rss_kb=max_rss,
        user_seconds=user,
        system_seconds=system,
        samples=samples,
        events=reader.events,
        stdout=out_path.read_text(errors="replace")[-4000:],
        stderr_tail=err_path.read_text(errors="replace")[-2000:],
    )


# --------------------------------------------------------------------------- rekbatch


@dataclasses.dataclass
class Variant:
    """Extra settings for rekbatch's runs, to compare variants of one engine."""

    env: dict[str, str]
    output_settings: list[str]
    memray: Path | None = None  # profile rekbatch's allocations into this file


def write_config(
    path: Path,
    *,
    bucket: str,
    out: Path,
    s3_url: str,
    rek_url: str,
    concurrency: int,
    variant: Variant,
) -> Path:
    lines = [
        "[job]",
        'name = "bench-engine"',
        f'output_dir = "{out}"',
        "",
        "[source]",
        f'uris = ["s3://{bucket}/"]',
        "sniff = false",
        "",
        "[aws]",
        f'region = "{REGION}"',
        'image_mode = "s3"',
        f's3_endpoint_url = "{s3_url}"',
        f'rekognition_endpoint_url = "{rek_url}"',
        "",
        "[limits]",
        f"concurrency = {concurrency}",
        "max_tps = 100000",
        "",
        "[[operations]]",
        'type = "detect_labels"',
        "",
    ]
    if variant.output_settings:
        lines += ["[output]", *variant.output_settings, ""]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def rekbatch_argv(config: Path, variant: Variant | None = None) -> list[str]:
    run = ["-m", "rekbatch", "run", str(config), "--log-format", "json"]
    if variant is not None and variant.memray is not None:
        # memray's own bookkeeping adds to the RSS measured: a profile, not a memory figure.
        profile = variant.memray.with_name(f"{variant.memray.stem}-{config.stem}.bin")
        profile.unlink(missing_ok=True)
        return [sys.executable, "-m", "memray", "run", "-q", "-o", str(profile), *run]
    return [sys.executable, *run]


def read_summary(out: Path) -> dict[str, Any]:
    try:
        summary: dict[str, Any] = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        return {}
    return summary


def rekbatch_commit() -> dict[str, Any]:
    """Which rekbatch is measured: the git commit of the imported package's checkout."""
    import rekbatch

    where = Path(rekbatch.__file__).resolve().parent
    info: dict[str, Any] = {"path": str(where), "version": getattr(rekbatch, "__version__", "")}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        git = ["git", "-C", str(where)]
        info["head"] = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
        # The last commit that changed the package: the engine measured, whatever else the
        # checkout's HEAD holds (benchmarks, docs).
        info["commit"] = subprocess.run(
            [*git, "log", "-1", "--format=%h", "--", "."],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--", "."],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
        info["src_dirty"] = bool(dirty)
    return info


def rekbatch_env(variant: Variant) -> dict[str, str]:
    return {**bench_env(), **variant.env}


# --------------------------------------------------------------------------- fakes


@contextlib.contextmanager
def fake_for_memory(s3: RunningServer, log_dir: Path) -> Iterator[tuple[RunningServer, str]]:
    """The fake that answers without fetching when its hook still fits; else the plain fake
    reading every object from the synthetic S3 (slower: then the fake is the bound)."""
    check = subprocess.run(
        [sys.executable, "-m", "benchmarks.fake_synthetic", "--check"],
        env=bench_env(), timeout=60, check=False, capture_output=True,
    )  # fmt: skip
    if check.returncode == 0:
        module, mode = "benchmarks.fake_synthetic", "answers from the key, no S3 fetch"
    else:
        module, mode = "tests.support.fake_rekognition", "fetches each object from synthetic S3"
    argv = [sys.executable, "-m", module, "--port", "0", "--s3-endpoint-url", s3.url]
    with url_server(argv, log_path=str(log_dir / "fake-memory.log")) as fake:
        yield fake, mode


def fake_with_cache(s3: RunningServer, log_dir: Path) -> Any:
    argv = [
        sys.executable, "-m", "tests.support.fake_rekognition", "--port", "0",
        "--s3-endpoint-url", s3.url, "--s3-cache",
    ]  # fmt: skip
    return url_server(argv, log_path=str(log_dir / "fake-throughput.log"))


def fake_calls(fake: RunningServer) -> dict[str, int]:
    stats = fake_admin(fake.url, "/_fake/stats")
    return {
        "calls": sum(int(n) for n in stats.get("calls", {}).values()),
        "ok": sum(int(n) for n in stats.get("ok", {}).values()),
        "max_in_flight": int(stats.get("max_in_flight", 0)),
    }


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no output on stderr)"


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def now_utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def phases(run: ProcessRun) -> dict[str, Any]:
    """Start-up and wind-down around the logged run: seconds from spawn to the first JSON log
    line and from the last one to exit, and when each event was first logged."""
    if not run.events:
        return {}
    first: dict[str, float] = {}
    for t, event in run.events:
        first.setdefault(event, t)
    return {
        "first_log_line_at": run.events[0][0],
        "after_last_log_line": round(run.wall_seconds - run.events[-1][0], 2),
        "first_logged": first,
    }


# --------------------------------------------------------------------------- memory


def _rss_at(samples: list[tuple[float, int]], moment: float) -> float | None:
    before = [rss for t, rss in samples if t <= moment]
    return round(before[-1] / 1024.0, 1) if before else None


def _thin(samples: list[tuple[float, int]], most: int) -> list[tuple[float, int]]:
    """At most about ``most`` evenly spaced samples, the highest always among them."""
    if len(samples) <= most:
        return samples
    step = -(-len(samples) // most)
    peak = max(range(len(samples)), key=lambda i: samples[i][1])
    return [s for i, s in enumerate(samples) if i % step == 0 or i == peak]


def _timeline(run: ProcessRun) -> dict[str, Any]:
    """Where the memory went: RSS at tenths of the run and at each first log event."""
    samples = run.samples
    if not samples:
        return {}
    peak_t, peak_kb = max(samples, key=lambda s: s[1])
    wall = run.wall_seconds
    first: dict[str, float] = {}
    for t, event in run.events:
        first.setdefault(event, t)
    return {
        "peak_sampled_mb": round(peak_kb / 1024.0, 1),
        "peak_at_fraction_of_run": round(peak_t / wall, 3) if wall else None,
        "rss_mb_at_tenths": [_rss_at(samples, wall * k / 10) for k in range(1, 11)],
        "rss_mb_at_events": {e: [t, _rss_at(samples, t)] for e, t in first.items()},
        "samples": [[t, round(kb / 1024.0, 1)] for t, kb in _thin(samples, MAX_SAMPLES_KEPT)],
    }


def measure_memory(
    sizes: list[int], concurrency: int, variant: Variant, work: Path, keep: bool
) -> dict[str, Any]:
    buckets = {f"bench-engine-{n}": n for n in sizes}
    rows: list[dict[str, Any]] = []
    with (
        synthetic_s3(buckets, log_path=str(work / "synthetic-s3.log")) as s3,
        fake_for_memory(s3, work) as (fake, fake_mode),
    ):
        print(f"memory: fake {fake_mode}", flush=True)
        for n in sizes:
            fake_admin(fake.url, "/_fake/reset", {})
            out = work / f"memory-{n}"
            config = write_config(
                work / f"memory-{n}.toml",
                bucket=f"bench-engine-{n}",
                out=out,
                s3_url=s3.url,
                rek_url=fake.url,
                concurrency=concurrency,
                variant=variant,
            )
            load = load_average()
            fake_cpu, s3_cpu = fake.cpu_seconds(), s3.cpu_seconds()
            run = timed_process(
                rekbatch_argv(config, variant),
                env=rekbatch_env(variant),
                timeout=600 + n / 100,
                log_dir=work,
                label=f"memory-{n}",
            )
            summary = read_summary(out)
            calls = int(summary.get("calls", {}).get("total", 0))
            row = {
                "objects": n,
                "measured_at": now_utc(),
                **run.as_dict(),
                "calls": calls,
                "by_status": summary.get("counts", {}).get("by_status", {}),
                "calls_per_second_whole_process": round(calls / run.wall_seconds, 1),
                "summary_calls_per_second": summary.get("calls_per_second"),
                "summary_elapsed_seconds": summary.get("elapsed_seconds"),
                "fake_cpu_seconds": round(fake.cpu_seconds() - fake_cpu, 2),
                "s3_cpu_seconds": round(s3.cpu_seconds() - s3_cpu, 2),
                "load_average_before": load,
                "timeline": _timeline(run),
            }
            if run.exit_code != 0:
                row["stderr_tail"] = run.stderr_tail
                print(f"FAILED memory-{n}: {_last_line(run.stderr_tail)}", flush=True)
            rows.append(row)
            print(
                f"memory {n}: {row['max_rss_mb']:.1f} MiB, {row['wall_seconds']:.1f} s, "
                f"{calls} calls, exit {run.exit_code}",
                flush=True,
            )
            if not keep:
                shutil.rmtree(out, ignore_errors=True)
    return {"fake": fake_mode, "concurrency": concurrency, "rows": rows}


def memory_section(
    measured: dict[str, Any], previous: dict[str, Any] | None, commit: dict[str, Any]
) -> dict[str, Any]:
    """The memory section of the results: rows of sizes measured now, plus rows of other
    sizes kept from ``previous`` when it measured the same rekbatch commit and variant (so
    ``--sizes 1000000`` can be run on its own later); the peak-RSS ratio over them all."""
    rows = {row["objects"]: row for row in measured["rows"]}
    same = ("commit", "src_dirty", "variant")
    before = (previous or {}).get("rekbatch") or {}
    if (
        previous
        and all(before.get(k) == commit.get(k) for k in same)
        and previous.get("fake") == measured["fake"]
        and previous.get("concurrency") == measured["concurrency"]
    ):
        for row in previous.get("rows", []):
            rows.setdefault(row["objects"], row)
    ordered = [rows[n] for n in sorted(rows)]
    by_size = {row["objects"]: row["max_rss_mb"] for row in ordered}
    smallest, largest = min(by_size), max(by_size)
    ratio = by_size[largest] / by_size[smallest] if by_size[smallest] else None
    return {
        **measured,
        "rekbatch": commit,
        "rows": ordered,
        "ratio": {
            "from": smallest,
            "to": largest,
            "value": round(ratio, 3) if ratio is not None else None,
        },
        "targets": {"max_rss_mb": MEMORY_TARGET_MB, "ratio_20k_to_1M": MEMORY_RATIO_TARGET},
    }


def memory_table(result: dict[str, Any]) -> str:
    lines = [
        "| objects | peak RSS (MiB) | wall s | calls | calls/s, whole process | "
        "calls/s, summary.json | exit |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['objects']:,} | {row['max_rss_mb']:.1f} | {row['wall_seconds']:.1f} | "
            f"{row['calls']:,} | {row['calls_per_second_whole_process']:.0f} | "
            f"{row['summary_calls_per_second']} | {row['exit_code']} |"
        )
    ratio = result["ratio"]
    lines.append("")
    lines.append(
        f"Peak RSS {ratio['to']:,} / {ratio['from']:,} objects: {ratio['value']} "
        f"(targets: at most {MEMORY_TARGET_MB:.0f} MB at every size, at most "
        f"{MEMORY_RATIO_TARGET} from 20k to 1M)."
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------- throughput


def _bare_argv(s3: RunningServer, fake: RunningServer, bucket: str, concurrency: int) -> list[str]:
    return [
        sys.executable, "-m", "benchmarks.bare_loop", "--s3-url", s3.url,
        "--rekognition-url", fake.url, "--bucket", bucket, "--concurrency", str(concurrency),
    ]  # fmt: skip


def measure_throughput(
    images: int, rounds: int, concurrency: int, variant: Variant, work: Path, keep: bool
) -> dict[str, Any]:
    bucket = f"bench-throughput-{images}"
    runs: list[dict[str, Any]] = []
    timeout = 300 + images / 20
    with (
        synthetic_s3({bucket: images}, log_path=str(work / "synthetic-s3.log")) as s3,
        fake_with_cache(s3, work) as fake,
    ):
        # Warm the fake's object cache (and the OS's file cache) before anything is timed.
        warm = timed_process(
            _bare_argv(s3, fake, bucket, concurrency),
            env=bench_env(), timeout=timeout, log_dir=work, label="warmup-bare",
        )  # fmt: skip
        if warm.exit_code != 0:
            raise RuntimeError(f"warm-up bare loop failed: {warm.stdout} {warm.stderr_tail}")
        for index in range(rounds):
            for contender in ("bare", "rekbatch"):
                label = f"throughput-{contender}-{index + 1}"
                out = work / label
                if contender == "bare":
                    argv, env = _bare_argv(s3, fake, bucket, concurrency), bench_env()
                else:
                    config = write_config(
                        work / f"{label}.toml",
                        bucket=bucket,
                        out=out,
                        s3_url=s3.url,
                        rek_url=fake.url,
                        concurrency=concurrency,
                        variant=variant,
                    )
                    argv, env = rekbatch_argv(config, variant), rekbatch_env(variant)
                fake_admin(fake.url, "/_fake/reset", {})
                load = load_average()
                fake_cpu = fake.cpu_seconds()
                run = timed_process(argv, env=env, timeout=timeout, log_dir=work, label=label)
                counted = fake_calls(fake)
                row: dict[str, Any] = {
                    "contender": contender,
                    "round": index + 1,
                    **run.as_dict(),
                    **counted,
                    "calls_per_second": round(counted["calls"] / run.wall_seconds, 1),
                    "client_cpu_share": round(
                        (run.user_seconds + run.system_seconds) / run.wall_seconds, 2
                    ),
                    "client_cpu_ms_per_call": round(
                        1000 * (run.user_seconds + run.system_seconds) / max(counted["calls"], 1), 3
                    ),
                    "fake_cpu_seconds": round(fake.cpu_seconds() - fake_cpu, 2),
                    "load_average_before": load,
                    "phases": phases(run),
                }
                if contender == "rekbatch":
                    summary = read_summary(out)
                    row["summary_calls_per_second"] = summary.get("calls_per_second")
                    row["summary_elapsed_seconds"] = summary.get("elapsed_seconds")
                    row["parquet_written"] = (out / "results.parquet").is_file()
                    if not keep:
                        shutil.rmtree(out, ignore_errors=True)
                else:
                    with contextlib.suppress(ValueError, IndexError):
                        row["bare_seconds"] = json.loads(run.stdout.splitlines()[-1])["seconds"]
                if run.exit_code != 0:
                    row["stderr_tail"] = run.stderr_tail
                    print(f"FAILED {label}: {_last_line(run.stderr_tail)}", flush=True)
                runs.append(row)
                print(
                    f"{label}: {counted['calls']} calls in {run.wall_seconds:.2f} s = "
                    f"{row['calls_per_second']:.0f}/s, exit {run.exit_code}",
                    flush=True,
                )
    ratios, cpu_ratios = [], []
    for index in range(rounds):
        pair = {r["contender"]: r for r in runs if r["round"] == index + 1}
        if pair["bare"]["calls_per_second"]:
            rate = pair["rekbatch"]["calls_per_second"] / pair["bare"]["calls_per_second"]
            ratios.append(round(rate, 3))
        if pair["rekbatch"]["client_cpu_ms_per_call"]:
            cpu = (
                pair["bare"]["client_cpu_ms_per_call"] / pair["rekbatch"]["client_cpu_ms_per_call"]
            )
            cpu_ratios.append(round(cpu, 3))
    return {
        "images": images,
        "rounds": rounds,
        "concurrency": concurrency,
        "fake": "tests.support.fake_rekognition --s3-cache, warmed, objects on synthetic S3",
        "runs": runs,
        "ratios_by_round": ratios,
        "median_ratio": statistics.median(ratios) if ratios else None,
        #: bare's CPU per call over rekbatch's: the same comparison, less shaken by a busy machine
        "cpu_ratios_by_round": cpu_ratios,
        "median_cpu_ratio": statistics.median(cpu_ratios) if cpu_ratios else None,
        "target_ratio": THROUGHPUT_RATIO_TARGET,
    }


def throughput_table(result: dict[str, Any]) -> str:
    lines = [
        "| round | contender | calls | wall s | calls/s, whole process | "
        "calls/s, summary.json | client CPU ms/call | client CPU / wall | fake CPU s | "
        "Parquet | exit |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for row in result["runs"]:
        parquet = row.get("parquet_written")
        lines.append(
            f"| {row['round']} | {row['contender']} | {row['calls']:,} | "
            f"{row['wall_seconds']:.2f} | {row['calls_per_second']:.0f} | "
            f"{row.get('summary_calls_per_second') or ''} | "
            f"{row['client_cpu_ms_per_call']:.2f} | {row['client_cpu_share']:.2f} | "
            f"{row['fake_cpu_seconds']:.1f} | "
            f"{'' if parquet is None else 'yes' if parquet else 'no'} | {row['exit_code']} |"
        )
    lines.append("")
    lines.append(
        f"rekbatch / bare by round: {result['ratios_by_round']}; median "
        f"{result['median_ratio']} (target at least {THROUGHPUT_RATIO_TARGET}). Client CPU per "
        f"call, bare / rekbatch, by round: {result['cpu_ratios_by_round']}; median "
        f"{result['median_cpu_ratio']}."
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes like 20000,100000: {text!r}") from None
    if not sizes or any(n < 1 or n >= 10**7 for n in sizes):
        raise argparse.ArgumentTypeError("sizes must be between 1 and 9,999,999")
    return sorted(set(sizes))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", choices=("memory", "throughput", "both"), default="both")
    parser.add_argument("--sizes", type=_sizes, default=_sizes("20000,100000,1000000"))
    parser.add_argument("--images", type=int, default=15000, help="throughput: objects")
    parser.add_argument("--rounds", type=int, default=3, help="throughput: rounds")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument(
        "--rekbatch-env", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
        help="environment of rekbatch's runs (e.g. REKBATCH_OUTPUT__UPLOAD_URI=...)",
    )  # fmt: skip
    parser.add_argument(
        "--output-setting", action="append", default=[], metavar="'KEY = TOML'",
        help="a line of the config's [output] table",
    )  # fmt: skip
    parser.add_argument("--label", default="", help="a variant's name: engine-LABEL.json")
    parser.add_argument("--work-dir", type=Path, default=None, help="default: a temp dir")
    parser.add_argument("--keep-outputs", action="store_true", help="keep rekbatch's outputs")
    parser.add_argument(
        "--memray", type=Path, default=None, metavar="FILE",
        help="run rekbatch under memray, one FILE-<config>.bin per run (a profile: RSS grows)",
    )  # fmt: skip
    args = parser.parse_args()
    variant = Variant(
        env=dict(args.rekbatch_env), output_settings=list(args.output_setting), memray=args.memray
    )
    os.chdir(REPO)  # the servers are started as modules of this checkout
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / (f"engine-{args.label}.json" if args.label else "engine.json")
    payload: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        payload = json.loads(path.read_text())
    commit = {**rekbatch_commit(), "variant": dataclasses.asdict(variant)}
    payload.update(
        {
            "rekbatch": commit,
            "variant": {"label": args.label, **dataclasses.asdict(variant)},
            "machine": {
                "cores": os.cpu_count(),
                "python": platform.python_version(),
                "peak_rss_from": TIME_BIN if os.access(TIME_BIN, os.X_OK) else "wait4",
            },
        }
    )
    with contextlib.ExitStack() as stack:
        if args.work_dir is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-engine-")))
        else:
            work = args.work_dir
            work.mkdir(parents=True, exist_ok=True)
        print(f"work dir: {work}", flush=True)
        tables: list[str] = []
        if args.only in ("memory", "both"):
            measured = measure_memory(
                args.sizes, args.concurrency, variant, work, args.keep_outputs
            )
            memory = memory_section(measured, payload.get("memory"), commit)
            payload["memory"] = memory
            path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
            tables.append("### Peak memory\n\n" + memory_table(memory))
        if args.only in ("throughput", "both"):
            throughput = measure_throughput(
                args.images, args.rounds, args.concurrency, variant, work, args.keep_outputs
            )
            throughput["measured_at"] = now_utc()
            throughput["rekbatch"] = commit
            payload["throughput"] = throughput
            path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
            tables.append("### Whole-process throughput\n\n" + throughput_table(throughput))
    print(f"\nwrote {path}\n")
    print("\n\n".join(tables))


if __name__ == "__main__":
    main()
