"""One object made ready for its operations: sniffed, and sent as it is, converted or skipped.

Per object the header is read once (a ranged read of ``HEAD_BYTES``, rarely a longer
second one, or the bytes already downloaded), the format and dimensions sniffed from it,
and each operation gets what ``filters.decide`` says: the image unchanged (an S3Object
reference or the bytes), a JPEG converted by the ``Converter`` (once per size limit: PPE
takes smaller images than the others), or a skip reason. Every record of a sniffed object
carries what was found and done (``IMAGE_FIELDS``).

A conversion is planned from the header before the object is downloaded: it holds its
plan's bytes plus the object's of the run's memory budget from the download to the end of
its encoding, and an image whose plan alone exceeds the budget is skipped (``too_large``,
the estimate in its message) without being downloaded or decoded.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from rekbatch.backends.base import ImageInput, ObjectBytes
from rekbatch.engine.delivery import Delivery
from rekbatch.records import IMAGE_FIELDS, ObjectRef, SkipReason
from rekbatch.sources import Source
from rekbatch.sources.convert import (
    ConversionError,
    Converted,
    Converter,
    TooManyPixels,
    TooMuchMemory,
)
from rekbatch.sources.decoding import Plan, megabytes
from rekbatch.sources.filters import (
    AS_IS,
    DEFAULT_MAX_PIXELS,
    MAX_IMAGE_BYTES,
    Convert,
    Decision,
    decide,
    side_limits,
)
from rekbatch.sources.sniff import HEAD_BYTES, MAX_HEAD_BYTES, ImageInfo, needs_more, sniff


@dataclass(frozen=True, slots=True)
class Failure:
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class Skip:
    """A skip with a message saying why (an estimate, a limit)."""

    reason: SkipReason
    message: str


Outcome = ImageInput | SkipReason | Skip | Failure


@dataclass(slots=True)
class Prepared:
    """Per operation type: what it gets, and the image fields of its record."""

    outcomes: dict[str, Outcome]
    extra: dict[str, dict[str, Any] | None]

    @property
    def sends(self) -> bool:
        return any(isinstance(o, ImageInput) for o in self.outcomes.values())

    @property
    def skipped(self) -> bool:
        return all(isinstance(o, str | Skip) for o in self.outcomes.values())


def _fields(info: ImageInfo | None, sent: tuple[int | None, int | None]) -> dict[str, Any]:
    values = (
        info.width if info else None,
        info.height if info else None,
        None,
        *sent,
        info.orientation if info else None,
    )
    return dict(zip(IMAGE_FIELDS, values, strict=True))


async def read_header(source: Source, obj: ObjectRef) -> tuple[bytes, ImageInfo | None]:
    """The object's first bytes and what they say: one ranged read, a second (longer) one
    only when the first held the format but not the dimensions."""
    head = await source.read_head(obj, HEAD_BYTES)
    info = sniff(head)
    if needs_more(info, head, obj.size):
        head = await source.read_head(obj, MAX_HEAD_BYTES)
        info = sniff(head)
    return head, info


def decisions(
    obj: ObjectRef,
    info: ImageInfo | None,
    operations: Iterable[str],
    *,
    by_reference: bool,
    convert: bool,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> dict[str, Decision]:
    """Per operation, what happens to a sniffed object sent this way: the run acts on it,
    ``plan`` counts it."""
    return {
        op: decide(
            obj,
            info,
            op,
            max_bytes=Delivery.image_limit(by_reference),
            convert=convert,
            max_pixels=max_pixels,
        )
        for op in operations
    }


class ImagePreparer:
    def __init__(
        self,
        sources: Sequence[Source],
        *,
        sniff: bool,
        converter: Converter | None,
        delivery: Delivery,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.sources = sources
        self.sniff = sniff
        self.converter = converter
        self.delivery = delivery
        self.max_pixels = max_pixels

    async def prepare(self, obj: ObjectRef, operations: list[str]) -> Prepared:
        """Raises what reading the object raises; conversion problems are per operation."""
        source = self.sources[obj.source_index]
        by_ref = self.delivery.by_reference(obj.bucket)
        if not self.sniff:
            # Sent as listed, unchecked: no sniffing, no conversion.
            image = (
                ImageInput(bucket=obj.bucket, key=obj.key, fetch=_fetch(source, obj, None))
                if by_ref
                else ImageInput(data=await source.read(obj))
            )
            return Prepared(dict.fromkeys(operations, image), dict.fromkeys(operations))
        data: bytes | None = None
        if by_ref or obj.size > MAX_IMAGE_BYTES:
            head, info = await read_header(source, obj)
        else:
            data = await source.read(obj)
            head = data[:MAX_HEAD_BYTES]
            info = sniff(head)
        if data is None and len(head) >= obj.size:
            data = head  # the whole object came with its head
        # A Region other than the bucket's is sent the bytes, read once for all operations.
        fetch = _fetch(source, obj, data) if by_ref else None
        decided = decisions(
            obj,
            info,
            operations,
            by_reference=by_ref,
            convert=self.converter is not None,
            max_pixels=self.max_pixels,
        )
        outcomes: dict[str, Outcome] = {}
        extra: dict[str, dict[str, Any] | None] = {}
        converted: dict[int, Converted | TooManyPixels | ConversionError | Skip] = {}
        for op, decision in decided.items():
            if isinstance(decision, Convert):
                if decision.max_side not in converted:
                    converted[decision.max_side], data = await self._convert(
                        source, obj, data, head, info, decision.max_side
                    )
                done = converted[decision.max_side]
                outcomes[op], extra[op] = _converted_outcome(done, info, op)
            elif decision == AS_IS:
                if by_ref:
                    outcomes[op] = ImageInput(bucket=obj.bucket, key=obj.key, fetch=fetch)
                else:
                    if data is None:
                        data = await source.read(obj)
                    outcomes[op] = ImageInput(data=data)
                sent = (info.width, info.height) if info else (None, None)
                extra[op] = _fields(info, sent)
            else:
                outcomes[op] = self._skip(decision, info)
                extra[op] = _fields(info, (None, None)) if info else None
        return Prepared(outcomes, extra)

    def _skip(self, reason: SkipReason, info: ImageInfo | None) -> SkipReason | Skip:
        pixels = info.pixels if info else None
        if reason == "too_large" and info and pixels is not None and pixels > self.max_pixels:
            return Skip(
                reason,
                f"the header declares {info.width}x{info.height} px, more than "
                f"source.max_pixels ({self.max_pixels:,})",
            )
        return reason

    async def _convert(
        self,
        source: Source,
        obj: ObjectRef,
        data: bytes | None,
        head: bytes,
        info: ImageInfo | None,
        max_side: int,
    ) -> tuple[Converted | TooManyPixels | ConversionError | Skip, bytes | None]:
        """The object downloaded (unless it is already) and converted, holding one of the
        converter's slots and its plan's share of the memory budget throughout, so few
        originals are in memory at once and their decoding stays within the budget."""
        converter = self.converter
        assert converter is not None
        memory = converter.memory
        # Planned to fit beside the object's bytes: a JPEG too large at full scale is
        # planned at a coarser one.
        fits = memory.total - obj.size
        plan = await converter.plan(data if data is not None else head, info, max_side, fits)
        # Without a plan (no header Pillow reads, no sniffed size) it decodes alone.
        need = memory.total if plan is None else plan.peak + obj.size
        if plan is not None and not memory.fits(need):
            return _too_large(plan, need, memory.total), data
        async with converter.slots:
            while True:
                async with memory.hold(need):
                    if data is None:
                        data = await source.read(obj)
                    try:
                        limit = need - len(data)
                        return await converter.convert(data, max_side, limit), data
                    except (TooManyPixels, ConversionError) as exc:
                        return exc, data
                    except TooMuchMemory as exc:
                        # The whole file's header asks more than its first bytes did.
                        more = exc.plan.peak + len(data)
                        if more <= need or not memory.fits(more):
                            return _too_large(exc.plan, more, memory.total), data
                need = more


def _too_large(plan: Plan, need: int, total: int) -> Skip:
    return Skip(
        "too_large",
        f"converting {plan.describe()} needs about {megabytes(need)} of memory, more than "
        f"source.convert_memory_mb ({total // (1024 * 1024):,} MB)",
    )


def _fetch(source: Source, obj: ObjectRef, data: bytes | None) -> ObjectBytes:
    return ObjectBytes(obj.size, lambda: source.read(obj), data)


def _converted_outcome(
    done: Converted | TooManyPixels | ConversionError | Skip, info: ImageInfo | None, op: str
) -> tuple[Outcome, dict[str, Any] | None]:
    if isinstance(done, ConversionError):
        return Failure(done.code, done.message), _fields(info, (None, None))
    if isinstance(done, Skip):
        return done, _fields(info, (None, None))
    if isinstance(done, TooManyPixels):
        fields = _fields(info, (None, None))
        fields["width"], fields["height"] = done.width, done.height
        return Skip("too_large", f"the image holds {done}, more than source.max_pixels"), fields
    fields = {
        "width": done.width,
        "height": done.height,
        "converted_from": info.format if info else done.converted_from,
        "sent_width": done.sent_width,
        "sent_height": done.sent_height,
        "exif_orientation": done.orientation,
    }
    if min(done.sent_width, done.sent_height) < side_limits(op)[0]:
        return "too_small", fields  # a very long strip, downscaled below the smallest side
    return ImageInput(data=done.data), fields
