"""Compare the offline backend's face detectors on the samples and on synthetic faces.

Detectors:

- ``dlib`` - the detector before issue 14 (main at f22294f): dlib's HOG upright and on copies
  turned +-25 degrees at a 1800 px canvas, weak hits confirmed by dlib's CNN (MMOD). It is
  loaded from a checkout of that commit, given with ``--before-src`` (for example made with
  ``git archive f22294f | tar -x -C /tmp/before`` and ``--before-src /tmp/before/src``).
- ``yuface`` - the current detector (libfacedetection on tiles, second look on an upright
  cut-out) at its default 1.5 MP canvas, and ``yuface-3mp`` at a 3 MP canvas.

Measured: the faces found in each sample photo; recall for the reference face pasted at 25,
30, 40, 60 and 100 px, upright and turned +-30 degrees, into the crowd photo enlarged to
1920x1440 and to 3264x2448 (``tests/faces_synthetic.py``); CPU seconds per image (one core,
DetectFaces: detection, landmarks, pose, quality; no embeddings).

    python -m benchmarks.compare_detectors --before-src /tmp/before/src

Prints a markdown table and writes ``benchmarks/results/detectors.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO))
# One thread per process, as the backend's workers run (before numpy and yuface load).
for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

from tests import faces_synthetic as synth  # noqa: E402

from rekbatch.backends.local import faces as local_faces  # noqa: E402

RESULTS = HERE / "results" / "detectors.json"
SAMPLES = (
    ("ric_harvey.jpeg", "1 (portrait)"),
    ("ric.jpg", "1"),
    ("ric_crowd1.jpg", "5 (group selfie)"),
    ("ric_crowd0.jpg", "dozens, 10-45 px"),
    ("sample-image0.jpeg", "1 (guitarist, head bowed)"),
    ("demo0.png", "1 (same photo in a screenshot)"),
    ("sample-image1.jpeg", "0 (a clownfish)"),
)
SIZES = (25.0, 30.0, 40.0, 60.0, 100.0)
ANGLES = (-30.0, 0.0, 30.0)
HOSTS = ((1920, 1440), (3264, 2448))

Detect = Callable[[bytes], dict[str, Any]]


def _load_before(src: Path) -> ModuleType:
    path = src / "rekbatch" / "backends" / "local" / "faces.py"
    spec = importlib.util.spec_from_file_location("before_faces", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"no faces.py under {src}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _timed(detect: Detect, data: bytes) -> tuple[dict[str, Any], float]:
    start = time.process_time()
    answer = detect(data)
    return answer, time.process_time() - start


def measure(name: str, detect: Detect) -> dict[str, Any]:
    detect((synth.SAMPLES / "ric.jpg").read_bytes())  # models loaded
    samples: dict[str, int] = {}
    seconds: list[float] = []
    for sample, _ in SAMPLES:
        answer, spent = _timed(detect, (synth.SAMPLES / sample).read_bytes())
        samples[sample] = len(answer["FaceDetails"])
        seconds.append(spent)
    recall: dict[str, dict[str, int]] = {}
    scene_seconds: list[float] = []
    for host in HOSTS:
        for angle in ANGLES:
            image, pasted = synth.scene([(px, angle) for px in SIZES], size=host)
            answer, spent = _timed(detect, synth.jpeg(image))
            scene_seconds.append(spent)
            for face in pasted:
                hit = any(
                    synth.found(face, d["BoundingBox"], image.size) for d in answer["FaceDetails"]
                )
                row = recall.setdefault(f"{host[0]}x{host[1]} {int(face.width)} px", {})
                row[f"{int(angle)}"] = int(hit)
    print(f"{name} done", file=sys.stderr)
    return {
        "samples": samples,
        "recall": recall,
        "median_cpu_s_samples": statistics.median(seconds),
        "median_cpu_s_scenes": statistics.median(scene_seconds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before-src", type=Path, help="src/ of a checkout of f22294f")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    detectors: dict[str, Detect] = {}
    if args.before_src is not None:
        detectors["dlib"] = _load_before(args.before_src).detect_faces
    detectors["yuface"] = local_faces.detect_faces
    detectors["yuface-3mp"] = lambda data: local_faces.detect_faces(data, megapixels=3.0)
    results = {name: measure(name, detect) for name, detect in detectors.items()}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")

    names = list(results)
    print("| sample | faces a person sees | " + " | ".join(names) + " |")
    print("|---|---|" + "---:|" * len(names))
    for sample, seen in SAMPLES:
        counts = " | ".join(str(results[n]["samples"][sample]) for n in names)
        print(f"| {sample} | {seen} | {counts} |")
    print()
    print("| pasted face | " + " | ".join(f"{n} (-30/0/+30)" for n in names) + " |")
    print("|---|" + "---:|" * len(names))
    for row in results[names[0]]["recall"]:
        cells = []
        for n in names:
            hits = results[n]["recall"][row]
            cells.append("/".join("yes" if hits[str(int(a))] else "no" for a in ANGLES))
        print(f"| {row} | " + " | ".join(cells) + " |")
    print()
    print("| CPU s per image (1 core) | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for key, label in (
        ("median_cpu_s_samples", "samples (median)"),
        ("median_cpu_s_scenes", "synthetic scenes, 2.8 and 8 MP (median)"),
    ):
        print(f"| {label} | " + " | ".join(f"{results[n][key]:.2f}" for n in names) + " |")
    print(f"\nwritten to {args.output}")


if __name__ == "__main__":
    main()
