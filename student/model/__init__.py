"""The student HOI detector: DETR (ResNet + transformer encoder) with a QPIC or MUREN-style decoder.

Public API::

    from student.model import HOIDetector, StudentModelConfig, load_detr_checkpoint

    model = HOIDetector(StudentModelConfig())              # the paper's architecture
    report = load_detr_checkpoint(model, "detr-r50-e632da11.pth")
    outputs = model(images, masks)                         # dict, see HOIDetector
"""

from student.model.config import (
    BackboneConfig,
    DecoderConfig,
    ModelError,
    StudentModelConfig,
    TransformerConfig,
)
from student.model.detector import HOIDetector
from student.model.detr_checkpoint import LoadReport, load_detr_checkpoint, read_detr_checkpoint

__all__ = [
    "BackboneConfig",
    "DecoderConfig",
    "HOIDetector",
    "LoadReport",
    "ModelError",
    "StudentModelConfig",
    "TransformerConfig",
    "load_detr_checkpoint",
    "read_detr_checkpoint",
]
