"""Recall of the offline face detector with yuface's phase jitter averaged out.

yuface's scores for faces near its smallest size (10-20 px on the canvas) move with where the
face falls on its 8-32 px grid, so a single photo's count moves by a few faces whenever the
canvas or the tiles move by a pixel (ric_crowd0.jpg: 28 to 36 faces for canvases of 0.7 to 1.2
MP, not in order). This measures recall over many placements instead:

- ``ric_crowd0.jpg``: 20 windows of 1060x760 pixels at different offsets (the same canvas
  scale for each), faces counted by ``detect_faces``;
- the reference face pasted at 27, 30, 33 and 36 px, turned -30, 0 and +30 degrees, at 13
  places along the wall of the crowd photo enlarged to 3264x2448 (8 MP): found or not.

``--src`` picks the code (as in ``bench_local_faces.py``); ``--megapixels`` the canvas.

    python benchmarks/recall_sweep.py [--src /tmp/before/src] [--megapixels 1.0]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_name, "1")


sys.path.insert(0, str(REPO))
from benchmarks.src_choice import use_src  # noqa: E402

SRC = use_src()

from PIL import Image  # noqa: E402
from tests import faces_synthetic as synth  # noqa: E402

from rekbatch.backends.local import faces as local_faces  # noqa: E402

WINDOW = (1060, 760)
OFFSETS_X = (0, 37, 81, 122)
OFFSETS_Y = (0, 29, 58, 95, 131)
SIZES = (27.0, 30.0, 33.0, 36.0)
ANGLES = (-30.0, 0.0, 30.0)
PLACES = tuple((0.12 + 0.061 * i, 0.28 + 0.017 * (i % 5)) for i in range(13))
HOST = (3264, 2448)


def crowd_windows(megapixels: float) -> list[int]:
    with Image.open(synth.HOST) as image:
        crowd = image.convert("RGB")
    counts = []
    for dx in OFFSETS_X:
        for dy in OFFSETS_Y:
            window = crowd.crop((dx, dy, dx + WINDOW[0], dy + WINDOW[1]))
            answer = local_faces.detect_faces(synth.jpeg(window), megapixels=megapixels)
            counts.append(len(answer["FaceDetails"]))
    return counts


def pasted_faces(megapixels: float) -> dict[str, list[int]]:
    found: dict[str, list[int]] = {}
    spots = synth.SPOTS
    try:
        for size in SIZES:
            for angle in ANGLES:
                for start in range(0, len(PLACES), len(spots)):
                    synth.SPOTS = PLACES[start : start + len(spots)]
                    faces = [(size, angle)] * len(synth.SPOTS)
                    image, pasted = synth.scene(faces, size=HOST)
                    answer = local_faces.detect_faces(synth.jpeg(image), megapixels=megapixels)
                    for face in pasted:
                        hit = any(
                            synth.found(face, d["BoundingBox"], image.size)
                            for d in answer["FaceDetails"]
                        )
                        found.setdefault(f"{int(size)} px", []).append(int(hit))
    finally:
        synth.SPOTS = spots
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=Path, default=REPO / "src", help="the code to measure")
    parser.add_argument("--megapixels", type=float, default=1.0)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    counts = crowd_windows(args.megapixels)
    found = pasted_faces(args.megapixels)
    result: dict[str, Any] = {
        "src": str(SRC),
        "megapixels": args.megapixels,
        "crowd_windows": counts,
        "pasted_found": found,
    }
    if args.output:
        args.output.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(
        f"ric_crowd0, {len(counts)} windows: mean {statistics.mean(counts):.2f} faces "
        f"(min {min(counts)}, max {max(counts)})"
    )
    cells = ", ".join(f"{key} {sum(hits)}/{len(hits)}" for key, hits in found.items())
    total = sum(sum(hits) for hits in found.values())
    print(f"pasted faces in {HOST[0]}x{HOST[1]}: {cells}; total {total}")


if __name__ == "__main__":
    main()
