"""``rekbatch report DIR``: the face answers of a job as one self-contained HTML page.

The page shows, for each person looked for (the reference of ``compare_faces``, each person
of ``search_faces``, each person ``rekbatch find`` looked up), the reference image and every
matched image as a thumbnail with the matched face boxed, captioned with its key and
similarity. Only matched images (and the references, once) are read; thumbnails are JPEG
data URIs, so ``report.html`` needs nothing else: no network, no files beside it.

The parts: ``model.py`` what the page shows; ``answers.py`` the face answers and
``results.py`` the one-call operations' sections, read into it; ``thumbs.py`` fetching and
drawing; ``page.py`` and ``templates/`` the HTML (Jinja2, autoescaped).

Pillow draws the thumbnails. They are decoded
as the run's conversions are (``sources/decoding.py``): reduced while decoding where the
format allows, within the job's ``source.max_pixels`` and ``source.convert_memory_mb``; an
image beyond them shows why in place of its thumbnail.
"""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rekbatch.commands.report.answers import (
    find_answers,
    read_summary,
    summary_answers,
    wanted_of,
)
from rekbatch.commands.report.model import Location, want
from rekbatch.commands.report.page import render_page
from rekbatch.commands.report.results import Sections, read_results
from rekbatch.commands.report.thumbs import (
    MAX_FETCH_CONCURRENCY,
    THUMB_PX,
    Fetcher,
    require_pillow,
)
from rekbatch.config import Config
from rekbatch.errors import EndpointNeverReached, EndpointUnreachable, SetupError

__all__ = ["REPORT_FILE", "THUMB_PX", "build_report"]

REPORT_FILE = "report.html"
# A report is asked for at a terminal: S3 out of reach is said at once (one request, one
# attempt, short timeouts), and an outage while thumbnails are read stops it within
# REPORT_UNREACHABLE_SECONDS, not the run's unreachable_seconds. report.html stays as it was.
PROBE_TIMEOUT_SECONDS = 5
REPORT_UNREACHABLE_SECONDS = 15.0


def _out_of_reach(cfg: Config, detail: str) -> SetupError:
    where = cfg.aws.s3_endpoint_url or f"AWS in {cfg.aws.region}"
    detail = " ".join(detail.split())
    return SetupError(
        f"report: S3 is out of reach at {where} ({detail}); {REPORT_FILE} was left as it was"
    )


async def _probe_s3(session: Any, cfg: Config, where: Location) -> None:
    """One request for one of the images, before any other: a ``SetupError`` at once when
    S3 cannot be reached. Any other answer (a missing object) is left to its thumbnail."""
    from aiobotocore.config import AioConfig

    from rekbatch.calls.classify import failure_of

    config = AioConfig(
        retries={"mode": "standard", "max_attempts": 1},
        connect_timeout=PROBE_TIMEOUT_SECONDS,
        read_timeout=PROBE_TIMEOUT_SECONDS * 2,
    )
    async with session.client("s3", endpoint_url=cfg.aws.s3_endpoint_url, config=config) as s3:
        try:
            await s3.head_object(Bucket=where.bucket, Key=where.key)
        except Exception as exc:
            failure = failure_of(exc)
            if failure is not None and failure.connection is not None:
                raise _out_of_reach(cfg, f"{failure.code}: {failure.message}") from None


async def build_report(output_dir: Path, cfg: Config, *, max_per_person: int | None = None) -> Path:
    """Write ``output_dir/report.html`` from the job's ``summary.json``; return its path.

    ``max_per_person`` caps the thumbnails per person (best similarity first); None shows all.
    Raises ``SetupError`` when Pillow is missing or the directory holds no face answer.
    """
    require_pillow()
    output_dir = Path(output_dir)
    summary = read_summary(output_dir)
    answers = summary_answers(summary, cfg) + find_answers(output_dir)
    results_path = output_dir / "results.jsonl"
    sections = None
    if results_path.exists():
        sections = Sections(await asyncio.to_thread(read_results, results_path))
        if not sections.results.records:
            sections = None
    if not answers and sections is None:
        raise SetupError(f"{output_dir}: no results to show (results.jsonl holds no record)")
    if max_per_person is not None and max_per_person < 1:
        raise ValueError("max_per_person must be at least 1")
    wanted = wanted_of(answers, max_per_person)
    if sections is not None:
        for where, entry in sections.wanted().items():
            for view in entry.views:
                want(wanted, where, view)
    needs_s3 = any(where.kind == "s3" for where in wanted)
    if needs_s3:
        import aioboto3

        from rekbatch.sources import S3

        session = aioboto3.Session(profile_name=cfg.aws.profile, region_name=cfg.aws.region)
        await _probe_s3(session, cfg, next(w for w in wanted if w.kind == "s3"))
        pool = min(cfg.limits.concurrency, MAX_FETCH_CONCURRENCY) + 4
        async with S3(
            session,
            endpoint_url=cfg.aws.s3_endpoint_url,
            pool=pool,
            unreachable_seconds=REPORT_UNREACHABLE_SECONDS,
        ) as s3:
            try:
                thumbs = await Fetcher(cfg, s3.read).all(wanted)
            except (EndpointUnreachable, EndpointNeverReached) as exc:
                raise _out_of_reach(cfg, str(exc)) from None
    else:
        thumbs = await Fetcher(cfg, None).all(wanted)
    job = str(summary.get("job") or cfg.job.name)
    page = render_page(job, answers, thumbs, datetime.now(UTC), max_per_person, sections)
    target = output_dir / REPORT_FILE
    tmp = target.with_name(f".{REPORT_FILE}.{os.getpid()}.tmp")
    await asyncio.to_thread(tmp.write_text, page, encoding="utf-8")
    os.replace(tmp, target)
    return target
