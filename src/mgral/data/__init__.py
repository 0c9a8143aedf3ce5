"""Dataset model (records, boxes) and the formats that read into and write from it."""

from mgral.data.records import (
    Category,
    Dataset,
    Detections,
    ImageId,
    ImageRecord,
    Target,
)

__all__ = ["Category", "Dataset", "Detections", "ImageId", "ImageRecord", "Target"]
