"""What is done to each image: the configured operations, as objects the engine runs alike.

The package imports its operations (and with them the sources and the AWS clients) only when
they are asked for, so that ``rekbatch.operations.summaries`` stays cheap to import: the
Parquet export runs in a child process that needs only the summaries.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rekbatch.config import Config
    from rekbatch.operations.base import Operation, OperationContext

__all__ = ["Operation", "OperationContext", "build_operations"]


def __getattr__(name: str) -> Any:
    if name in ("Operation", "OperationContext"):
        from rekbatch.operations import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_operations(cfg: Config) -> list[Operation]:
    """The job's operations, in config order."""
    from rekbatch.config import CompareFacesOp, IndexFacesOp, SearchFacesOp
    from rekbatch.operations.compare_faces import CompareFacesOperation
    from rekbatch.operations.detect import DetectOperation
    from rekbatch.operations.index_faces import IndexFacesOperation
    from rekbatch.operations.search_faces import SearchFacesOperation

    built: list[Operation] = []
    for op in cfg.operations:
        if isinstance(op, CompareFacesOp):
            built.append(CompareFacesOperation(op))
        elif isinstance(op, SearchFacesOp):
            built.append(SearchFacesOperation(op))
        elif isinstance(op, IndexFacesOp):
            # The offline index is scanned, not searched 4,096 faces at a time: one collection.
            sharded = cfg.backend.kind == "aws"
            built.append(IndexFacesOperation(op, sharded=sharded, output_dir=cfg.job.output_dir))
        else:
            built.append(DetectOperation(op))
    return built
