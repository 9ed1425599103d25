"""Student data: class names, annotation loading, datasets, transforms, synthetic data.

Kept light on purpose: importing ``student.data`` pulls in no torch, so other modules (and the
teacher's HTTP API via ``student.prompts``) can import the class lists cheaply. Import the heavy
parts from their modules: ``student.data.hoi_dataset``, ``student.data.transforms``, ...
"""

from student.data.errors import DatasetError

__all__ = ["DatasetError"]
