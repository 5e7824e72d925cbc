"""What ``prefilter = "faces"`` would save, estimated by ``plan`` from a sample.

The offline detector looks at a random sample of the eligible images (read in full, as the run
would for the pre-filter); the share with no face found stands for the whole listing, with a
95% margin from the sample's size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from rekbatch.records import ObjectRef
from rekbatch.sources import Source

# Images the detector looks at: enough for a margin of about ±15 points, a few seconds of CPU.
SAMPLE = 40


@dataclass(frozen=True)
class PrefilterEstimate:
    looked: int
    no_face: int

    @property
    def share(self) -> float:
        return self.no_face / self.looked if self.looked else 0.0

    @property
    def margin(self) -> float:
        """Half-width of a 95% interval on ``share`` (normal approximation, at least 1/n)."""
        if not self.looked:
            return 1.0
        p = self.share
        return max(1.96 * math.sqrt(p * (1 - p) / self.looked), 1 / self.looked)

    def as_dict(self) -> dict[str, Any]:
        return {
            "sampled": self.looked,
            "no_face": self.no_face,
            "share_no_face": round(self.share, 3),
            "margin": round(self.margin, 3),
        }


async def estimate(sample: list[tuple[Source, ObjectRef]]) -> PrefilterEstimate:
    """Run the local detector over ``sample``; images it cannot decode count as faces (the run
    would send them)."""
    from rekbatch.backends.local.backend import FaceFinder

    finder = FaceFinder()
    no_face = looked = 0
    try:
        for source, obj in sample:
            try:
                data = await source.read(obj)
                found = await finder.has_face(data)
            except Exception:
                found = True
            looked += 1
            no_face += not found
    finally:
        await finder.aclose()
    return PrefilterEstimate(looked, no_face)
