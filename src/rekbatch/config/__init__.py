"""The job config: pydantic models (``model``) and reading them from file, environment and
flags (``loading``)."""

from rekbatch.config.loading import config_from_data, load_config
from rekbatch.config.model import (
    CompareFacesOp,
    Config,
    DetectFacesOp,
    DetectLabelsOp,
    DetectModerationLabelsOp,
    DetectProtectiveEquipmentOp,
    DetectTextOp,
    IndexFacesOp,
    Operation,
    OperationType,
    RecognizeCelebritiesOp,
    SearchFacesOp,
    parse_s3_uri,
    source_kind,
    uses_s3,
)

__all__ = [
    "CompareFacesOp",
    "Config",
    "DetectFacesOp",
    "DetectLabelsOp",
    "DetectModerationLabelsOp",
    "DetectProtectiveEquipmentOp",
    "DetectTextOp",
    "IndexFacesOp",
    "Operation",
    "OperationType",
    "RecognizeCelebritiesOp",
    "SearchFacesOp",
    "config_from_data",
    "load_config",
    "parse_s3_uri",
    "source_kind",
    "uses_s3",
]
