"""One object made ready for its operations: sniffed, and sent as it is, converted or skipped.

Per object the header is read once (a ranged read of ``HEAD_BYTES``, rarely a longer
second one, or the bytes already downloaded), the format and dimensions sniffed from it,
and each operation gets what ``filters.decide`` says: the image unchanged (an S3Object
reference or the bytes), a JPEG converted by the ``Converter`` (once per size limit: PPE
takes smaller images than the others), or a skip reason. Every record of a sniffed object
carries what was found and done (``IMAGE_FIELDS``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from rekbatch.backends.base import ImageInput
from rekbatch.engine.delivery import Delivery
from rekbatch.records import IMAGE_FIELDS, ObjectRef, SkipReason
from rekbatch.sources import Source
from rekbatch.sources.convert import ConversionError, Converted, Converter, TooManyPixels
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


Outcome = ImageInput | SkipReason | Failure


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
        return all(isinstance(o, str) for o in self.outcomes.values())


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
                ImageInput(bucket=obj.bucket, key=obj.key)
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
        converted: dict[int, Converted | TooManyPixels | ConversionError] = {}
        for op, decision in decided.items():
            if isinstance(decision, Convert):
                if decision.max_side not in converted:
                    converted[decision.max_side], data = await self._convert(
                        source, obj, data, decision.max_side
                    )
                done = converted[decision.max_side]
                outcomes[op], extra[op] = _converted_outcome(done, info, op)
            elif decision == AS_IS:
                if by_ref:
                    outcomes[op] = ImageInput(bucket=obj.bucket, key=obj.key)
                else:
                    if data is None:
                        data = await source.read(obj)
                    outcomes[op] = ImageInput(data=data)
                sent = (info.width, info.height) if info else (None, None)
                extra[op] = _fields(info, sent)
            else:
                outcomes[op] = decision
                extra[op] = _fields(info, (None, None)) if info else None
        return Prepared(outcomes, extra)

    async def _convert(
        self, source: Source, obj: ObjectRef, data: bytes | None, max_side: int
    ) -> tuple[Converted | TooManyPixels | ConversionError, bytes]:
        """The object downloaded (unless it is already) and converted, holding one of the
        converter's slots throughout, so few originals are in memory at once."""
        assert self.converter is not None
        async with self.converter.slots:
            if data is None:
                data = await source.read(obj)
            try:
                return await self.converter.convert(data, max_side), data
            except (TooManyPixels, ConversionError) as exc:
                return exc, data


def _converted_outcome(
    done: Converted | TooManyPixels | ConversionError, info: ImageInfo | None, op: str
) -> tuple[Outcome, dict[str, Any] | None]:
    if isinstance(done, ConversionError):
        return Failure(done.code, done.message), _fields(info, (None, None))
    if isinstance(done, TooManyPixels):
        fields = _fields(info, (None, None))
        fields["width"], fields["height"] = done.width, done.height
        return "too_large", fields
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
