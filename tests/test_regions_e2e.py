"""A run over three Regions through real HTTP: one fake endpoint, a quota per signing Region.

The job's clients (one per Region, all on the fake's URL, each signing for its Region) read
their ceilings from the fake's Service Quotas, spread the calls, and keep every object x
operation exactly once, also when a Region becomes unreachable mid-run. What these tests
assert holds at any machine speed; the rates are in ``benchmarks/bench_regions.py``.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import make_bucket
from tests.helpers import exactly_once, fake_jpeg, invoke, read_jsonl, write_config
from tests.support.clients import aws_client
from tests.support.configs import job_config
from tests.support.fake_rekognition import FakeRekognition
from tests.support.moto import put_objects
from tests.support.servers import ServedJob, StartFake

pytestmark = pytest.mark.timeout(120)

HOME = "eu-west-1"  # the bucket's Region (the test S3 is in eu-west-1)
REGIONS = [HOME, "us-east-1", "us-west-2"]
IMAGES = 300
QUOTA = 40.0


@pytest.fixture(scope="module")
def bucket(moto_endpoint: str) -> str:
    s3 = aws_client("s3", moto_endpoint, HOME)
    name = make_bucket(s3, "regions-bucket")
    put_objects(name, ((f"img/{i:04d}.jpg", fake_jpeg(i)) for i in range(IMAGES)))
    return name


@pytest.fixture
def fake(start_fake: StartFake, monkeypatch: pytest.MonkeyPatch) -> FakeRekognition:
    server = start_fake(
        quotas={"DetectLabels": QUOTA},  # each signing Region its own bucket of 40/s
        applied_quotas={region: {"DetectLabels": QUOTA} for region in REGIONS},
        latency_median_ms=20.0,
        check_bucket_region=True,  # an S3Object only in its bucket's Region, as AWS
    )
    monkeypatch.setenv("AWS_ENDPOINT_URL_SERVICE_QUOTAS", server.url)
    return server


def _config(tmp_path: Path, bucket: str, moto: str, rek: str) -> Path:
    text = job_config(
        uris=[f"s3://{bucket}/"],
        output_dir=tmp_path / "out",
        s3_endpoint=moto,
        rek_endpoint=rek,
        operations='[[operations]]\ntype = "detect_labels"\n',
        limits={"concurrency": 32},
        source={"sniff": False},
        aws={"regions": list(REGIONS)},
    )
    return write_config(tmp_path / "job.toml", text)


def _exactly_once_ok(out: Path) -> list[dict[str, Any]]:
    return exactly_once(out, IMAGES, all_ok=True)


def test_three_regions_share_the_run_exactly_once(
    tmp_path: Path, bucket: str, moto_endpoint: str, fake: FakeRekognition
) -> None:
    result = invoke("run", str(_config(tmp_path, bucket, moto_endpoint, fake.url)))
    assert result.exit_code == 0, result.stderr
    out = tmp_path / "out"
    _exactly_once_ok(out)
    stats = fake.stats()
    served = stats["regions"]
    assert set(served) == set(REGIONS)
    assert all(served[region].get("ok", 0) > 0 for region in REGIONS), served
    calls = sum(s["calls"] for s in served.values())
    throttled = sum(s.get("throttled", 0) for s in served.values())
    assert throttled <= 0.02 * calls, served
    # The bucket's Region reads the objects itself; the others are sent the bytes.
    by_reference = sum(n for key, n in stats["billed"].items() if key[1].startswith("s3://"))
    assert by_reference == served[HOME]["ok"]
    assert sum(stats["billed"].values()) == IMAGES
    # Ceilings from Service Quotas (40), not the default table (50 in eu-west-1).
    assert stats["service_quotas"].get("ListServiceQuotas") == len(REGIONS)
    assert "quotas_from_service_quotas" in result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["limiters"]["DetectLabels"]["ceiling"] == QUOTA
    regions = summary["regions"]
    assert {r: s["ok"] for r, s in regions.items()} == {r: served[r]["ok"] for r in REGIONS}
    assert all(regions[r]["ceilings"] == {"DetectLabels": QUOTA} for r in REGIONS)
    assert summary["spreading"]["objects_read"] == IMAGES - served[HOME]["ok"]
    assert summary["spreading"]["bytes_to_other_regions"] > 0

    status = invoke("status", str(out))
    assert status.exit_code == 0
    for region in REGIONS:
        assert f"  {region}: {regions[region]['calls']} calls" in status.stdout


class _CutRegionAfter(threading.Thread):
    """Makes ``region`` unreachable once the fake has answered ``calls`` calls."""

    def __init__(self, fake: FakeRekognition, region: str, calls: int) -> None:
        super().__init__(daemon=True)
        self.fake, self.region, self.calls = fake, region, calls
        self.stop = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + 60
        while not self.stop.is_set() and time.monotonic() < deadline:
            if self.fake.stats()["call_number"] >= self.calls:
                self.fake.configure(region_faults={self.region: "reset"})
                return
            time.sleep(0.01)


def test_a_region_unreachable_mid_run_leaves_the_others_to_finish(
    tmp_path: Path, bucket: str, moto_endpoint: str, fake: FakeRekognition
) -> None:
    cutter = _CutRegionAfter(fake, "us-west-2", calls=60)
    cutter.start()
    try:
        result = invoke("run", str(_config(tmp_path, bucket, moto_endpoint, fake.url)))
    finally:
        cutter.stop.set()
        cutter.join(timeout=5)
    assert result.exit_code == 0, result.stderr
    out = tmp_path / "out"
    _exactly_once_ok(out)
    served = fake.stats()["regions"]
    assert served["us-west-2"].get("reset", 0) > 0  # it was cut off while the run went on
    assert "region_left_rotation" in result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["regions"]["us-west-2"]["out_of_rotation"] == ["DetectLabels"]
    after = {r: served[r].get("ok", 0) for r in REGIONS}
    assert sum(after.values()) == IMAGES and after[HOME] > 0 and after["us-east-1"] > 0
    assert max(r["attempts"] for r in read_jsonl(out / "results.jsonl")) <= 8


def test_plan_reads_the_quotas_and_times_each_region_set(
    tmp_path: Path, bucket: str, moto_endpoint: str, fake: FakeRekognition
) -> None:
    result = invoke("plan", str(_config(tmp_path, bucket, moto_endpoint, fake.url)))
    assert result.exit_code == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("time in ")]
    assert [line.split("  ")[0] for line in lines] == [
        "time in eu-west-1",
        "time in eu-west-1, us-east-1",
        "time in eu-west-1, us-east-1, us-west-2",
    ]
    assert "calls DetectLabels: 300 at up to 40/s" in result.stdout  # Service Quotas' 40
    assert "8 s" in lines[0] and "spreading adds $" in lines[2]
    assert "(list prices as of 2026-12-07)" in result.stdout
    assert fake.stats()["calls"] == {}  # no Rekognition call


def test_rekognition_region_bucket_calls_each_bucket_in_its_own_region(
    tmp_path: Path, bucket: str, moto_endpoint: str, fake: FakeRekognition, served_job: ServedJob
) -> None:
    s3 = aws_client("s3", moto_endpoint, "us-west-2")
    west = "regions-west-bucket"
    s3.create_bucket(Bucket=west, CreateBucketConfiguration={"LocationConstraint": "us-west-2"})
    put_objects(west, ((f"w/{i:03d}.jpg", fake_jpeg(10_000 + i)) for i in range(60)))
    config = served_job(
        fake,
        f"s3://{bucket}/",
        f"s3://{west}/",
        operations='[[operations]]\ntype = "detect_labels"\n',
        limits={"concurrency": 16},
        source={"sniff": False},
        aws={"rekognition_region": "bucket"},
    )
    result = invoke("run", str(config))
    assert result.exit_code == 0, result.stderr
    rows = read_jsonl(tmp_path / "out" / "results.jsonl")
    assert len(rows) == IMAGES + 60 and all(r["status"] == "ok" for r in rows)
    stats = fake.stats()
    # Every object by reference, in its own bucket's Region (the fake refuses any other).
    assert all(ident.startswith("s3://") for _, ident in stats["billed"])
    assert stats["regions"]["us-west-2"]["ok"] == 60
    assert stats["regions"][HOME]["ok"] == IMAGES
    assert set(stats["regions"]) == {HOME, "us-west-2"}
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert "spreading" in summary and summary["spreading"]["objects_read"] == 0


def test_validate_online_asks_every_region(
    tmp_path: Path, bucket: str, moto_endpoint: str, fake: FakeRekognition
) -> None:
    config = _config(tmp_path, bucket, moto_endpoint, fake.url)
    assert invoke("validate", "--online", str(config)).exit_code == 0
    fake.configure(region_faults={"us-west-2": "denied"})
    result = invoke("validate", "--online", str(config))
    assert result.exit_code == 2
    assert "aws.regions: " in result.stderr and "us-west-2" in result.stderr
    assert "aws.region:" not in result.stderr
    assert fake.stats()["regions"]["us-east-1"] == {"calls": 2, "ok": 2}
