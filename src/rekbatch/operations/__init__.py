"""What is done to each image: the configured operations, as objects the engine runs alike."""

from __future__ import annotations

from rekbatch.config import CompareFacesOp, Config, SearchFacesOp
from rekbatch.operations.base import Operation, OperationContext
from rekbatch.operations.compare_faces import CompareFacesOperation
from rekbatch.operations.detect import DetectOperation
from rekbatch.operations.search_faces import SearchFacesOperation

__all__ = ["Operation", "OperationContext", "build_operations"]


def build_operations(cfg: Config) -> list[Operation]:
    """The job's operations, in config order."""
    built: list[Operation] = []
    for op in cfg.operations:
        if isinstance(op, CompareFacesOp):
            built.append(CompareFacesOperation(op))
        elif isinstance(op, SearchFacesOp):
            built.append(SearchFacesOperation(op))
        else:
            built.append(DetectOperation(op))
    return built
