"""``plan`` at scale: parallel listing, sniffing a random sample, done work left out."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from rekbatch.commands.plan import margin, render_plan
from rekbatch.config import load_config
from rekbatch.engine import Job, RunOptions
from tests.conftest import REGION, make_bucket
from tests.helpers import fake_jpeg, invoke, write_config
from tests.support.fake_backend import FakeBackend
from tests.support.moto import put_objects

JPEGS, LIARS = 300, 100


def _fill(s3: Any, bucket: str) -> None:
    make_bucket(s3, bucket)
    objects = [(f"img/{i:05d}.jpg", fake_jpeg(i)) for i in range(JPEGS)]
    objects += [
        (f"img/{i:05d}.jpg", b"not a picture " * 9 + bytes([i % 251]))
        for i in range(JPEGS, JPEGS + LIARS)
    ]
    put_objects(bucket, objects)


def _config_text(tmp_path: Path, bucket: str, moto: str) -> str:
    return (
        f'[job]\nname = "plan"\noutput_dir = "{tmp_path / "out"}"\n'
        f'[source]\nuris = ["s3://{bucket}/"]\n'
        f'[aws]\nregion = "{REGION}"\ns3_endpoint_url = "{moto}"\n'
        '[[operations]]\ntype = "detect_labels"\n'
    )


def test_margin_is_zero_when_everything_was_read() -> None:
    assert margin(30, 100, 100) == 0
    assert margin(0, 0, 10) == 0
    # 95% interval of a half/half split, 400 of 10,000: about ±4.9 points.
    assert 470 <= margin(200, 400, 10_000) <= 490


def test_plan_sniffs_a_sample_and_states_the_margin(
    s3: Any, moto_endpoint: str, tmp_path: Path
) -> None:
    _fill(s3, "plan-sample")
    config = write_config(
        tmp_path / "job.toml", _config_text(tmp_path, "plan-sample", moto_endpoint)
    )
    result = invoke("plan", str(config), "--json", "--sample", "100")
    assert result.exit_code == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["objects_listed"] == JPEGS + LIARS
    sample = plan["sample"]
    assert "±" in render_plan(plan) and "a random 100 of 400" in render_plan(plan)
    assert sample == {**sample, "candidates": JPEGS + LIARS, "sniffed": 100, "exact": False}
    jpeg, wrong = plan["eligible_by_type"]["jpeg"], plan["skipped_by_reason"]["not_image"]
    assert jpeg + wrong == JPEGS + LIARS
    spread = sample["margins"]["jpeg"]
    assert 0 < spread < 80 and abs(jpeg - JPEGS) <= spread * 1.5

    exact = json.loads(invoke("plan", str(config), "--json", "--sample", "all").stdout)
    assert exact["sample"]["exact"] and exact["sample"]["margins"] == {}
    assert exact["eligible_by_type"] == {"jpeg": JPEGS}
    assert exact["skipped_by_reason"] == {"not_image": LIARS}

    bad = invoke("plan", str(config), "--sample", "some")
    assert bad.exit_code == 2 and "--sample" in bad.stderr


def test_plan_leaves_out_what_the_output_directory_has_done(
    s3: Any, moto_endpoint: str, tmp_path: Path
) -> None:
    _fill(s3, "plan-done")
    config = write_config(tmp_path / "job.toml", _config_text(tmp_path, "plan-done", moto_endpoint))
    cfg = load_config(config, environ={})
    capped = cfg.model_copy(update={"limits": cfg.limits.model_copy(update={"max_images": 150})})
    job = Job(capped, RunOptions(output_dir=tmp_path / "out"), backend=FakeBackend())
    assert asyncio.run(job.run()).exit_code == 4
    result = invoke("plan", str(config), "--json", "--sample", "all")
    assert result.exit_code == 0, result.stderr
    plan = json.loads(result.stdout)
    done = plan["objects_done"]
    assert done >= 150 and plan["objects_left"] == JPEGS + LIARS - done
    assert plan["images_eligible"] + plan["skipped_by_reason"].get("not_image", 0) == (
        JPEGS + LIARS - done
    )
    assert f"{done} done, {JPEGS + LIARS - done} left" in render_plan(plan)
