"""Budget caps: stop cleanly before the image that would pass ``max_images`` or
``max_cost_usd``. Checking and taking happen with no await between them, so concurrent
workers never overshoot a cap."""

from __future__ import annotations

from collections.abc import Mapping

from rekbatch.pricing import estimate_cost


class Budget:
    def __init__(
        self,
        *,
        max_images: int | None,
        max_cost_usd: float | None,
        region: str,
        calls_per_image: Mapping[str, int],
        images_before: int,
    ) -> None:
        self.max_images = max_images
        self.max_cost_usd = max_cost_usd
        self.region = region
        # The most calls one image can cost: search_faces' compare strategy up to one per
        # reference.
        self.calls_per_image = dict(calls_per_image)
        self.images_before = images_before
        self.reserved = 0

    def reserve(self) -> str | None:
        """Take one image from the budget: None, or why the run must stop."""
        images = self.images_before + self.reserved
        if self.max_images is not None and images >= self.max_images:
            return "budget: limits.max_images reached"
        if self.max_cost_usd is not None:
            calls = {api: (images + 1) * n for api, n in self.calls_per_image.items()}
            if estimate_cost(calls, region=self.region) > self.max_cost_usd:
                return "budget: limits.max_cost_usd reached"
        self.reserved += 1
        return None

    def release(self) -> None:
        """An image reserved but not sent after all (skipped when sniffed)."""
        self.reserved -= 1
