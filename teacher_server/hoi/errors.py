"""The one exception type of the data domain."""

from __future__ import annotations


class DatasetError(ValueError):
    """A dataset file or annotation is missing or malformed.

    Messages name the file, the entry (image index in the annotation list), the field and what
    would be valid, e.g. ``trainval_hico.json: entry 12 (HICO_train2015_00000013.jpg):
    hoi_annotation[3].category_id = 140 is outside 1..117``.
    """
