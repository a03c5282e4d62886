"""``segfactory export``: a segfactory dataset in the layouts other tools read (VOC, ADE20K,
Cityscapes, a plain folder, COCO JSON, a Hugging Face dataset with its card)."""

from pipelines.export.run import ExportError, check_export, export_dataset
from pipelines.export.writers import FORMATS

__all__ = ["FORMATS", "ExportError", "check_export", "export_dataset"]
