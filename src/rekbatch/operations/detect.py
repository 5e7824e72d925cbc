"""The operations that are one call per image and nothing else."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rekbatch.backends.base import ImageInput
from rekbatch.calls.caller import CallOutcome
from rekbatch.config import (
    DetectFacesOp,
    DetectLabelsOp,
    DetectModerationLabelsOp,
    DetectProtectiveEquipmentOp,
    DetectTextOp,
    RecognizeCelebritiesOp,
)
from rekbatch.operations.base import Operation
from rekbatch.records import ObjectRef

if TYPE_CHECKING:
    from rekbatch.calls.caller import Caller

SingleCallOp = (
    DetectFacesOp
    | DetectLabelsOp
    | DetectTextOp
    | DetectModerationLabelsOp
    | RecognizeCelebritiesOp
    | DetectProtectiveEquipmentOp
)


def request_params(op: SingleCallOp) -> tuple[str, dict[str, Any]]:
    """The API an operation config stands for, and its request parameters (without the
    image, which the engine attaches)."""
    match op:
        case DetectFacesOp():
            return "DetectFaces", {"Attributes": list(op.attributes)}
        case DetectLabelsOp():
            return "DetectLabels", {"MaxLabels": op.max_labels, "MinConfidence": op.min_confidence}
        case DetectTextOp():
            params: dict[str, Any] = {}
            if op.min_confidence is not None:
                params["Filters"] = {"WordFilter": {"MinConfidence": op.min_confidence}}
            return "DetectText", params
        case DetectModerationLabelsOp():
            return "DetectModerationLabels", {"MinConfidence": op.min_confidence}
        case DetectProtectiveEquipmentOp():
            ppe: dict[str, Any] = {"MinConfidence": op.min_confidence}
            if op.required_equipment:
                ppe["RequiredEquipmentTypes"] = list(op.required_equipment)
            return "DetectProtectiveEquipment", {"SummarizationAttributes": ppe}
        case RecognizeCelebritiesOp():
            return "RecognizeCelebrities", {}
    raise ValueError(f"operation {op.type!r} is not a single-call operation")


class DetectOperation(Operation):
    """detect_faces, detect_labels, detect_text, detect_moderation_labels,
    recognize_celebrities, detect_protective_equipment."""

    def __init__(self, op: SingleCallOp) -> None:
        self.type = op.type
        self.api, self.params = request_params(op)
        self.prefilter = getattr(op, "prefilter", None) == "faces"

    async def process(self, image: ImageInput, obj: ObjectRef, caller: Caller) -> CallOutcome:
        return await caller.call(self.api, self.params, {"Image": image})
