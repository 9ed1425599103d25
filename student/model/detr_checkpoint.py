"""Initialise a ``HOIDetector`` from an original DETR COCO checkpoint (``detr-r50-e632da11.pth`` layout).

The checkpoint is ``{"model": state_dict}`` with DETR's names. They map onto ours as follows
(QPIC's recipe for the heads):

=================================  ===================================================================
DETR key                           HOIDetector key(s)
=================================  ===================================================================
``backbone.0.body.<name>``         ``backbone.body.<name>`` (torchvision ResNet names, 1:1)
``input_proj.*``                   ``input_proj.*``
``transformer.encoder.<rest>``     ``encoder.<rest>``
``transformer.decoder.<rest>``     single: ``decoder.transformer.<rest>``; three-branch: the same
                                   tensors into each of ``decoder.{human,object,interaction}_branch.<rest>``
``query_embed.weight`` (100, d)    its first ``num_queries`` rows -> ``decoder.query_embed.weight``
                                   (three-branch: into each of the three query tables)
``class_embed.*`` (92 rows)        ``decoder.heads.obj_class_embed.*``: rows of the 80 valid COCO ids
                                   (object index i <- DETR row COCO_OBJECT_IDS[i]), then the last
                                   row (DETR's no-object) -> our no-object row 80
``bbox_embed.layers.{0,1,2}.*``    cloned into ``decoder.heads.sub_bbox_embed`` and ``obj_bbox_embed``
=================================  ===================================================================

Everything else (verb head, three-branch relational and fusion modules) keeps its initial values
and is listed in ``LoadReport.missing``; checkpoint keys with no place in the model (e.g. layers
beyond the model's depth) are listed in ``LoadReport.unexpected``. A tensor whose shape does not
fit raises ``ModelError`` naming both keys and both shapes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from student.model.config import ModelError
from student.model.detector import HOIDetector
from teacher_server.hoi.classes import COCO_OBJECT_IDS

DETR_R50_FILE = "detr-r50-e632da11.pth"
DETR_R50_URL = "https://dl.fbaipublicfiles.com/detr/detr-r50-e632da11.pth"
_THREE_BRANCHES = ("decoder.human_branch.", "decoder.object_branch.", "decoder.interaction_branch.")
_THREE_BRANCH_QUERIES = tuple(f"decoder.{name}_query_embed.weight" for name in ("human", "object", "interaction"))


@dataclass
class LoadReport:
    """What ``load_detr_checkpoint`` did.

    ``loaded``: model keys written from the checkpoint; ``missing``: model keys the checkpoint did
    not provide (left as initialised); ``unexpected``: checkpoint keys that found no place.
    """

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for logs."""
        return (
            f"DETR checkpoint: {len(self.loaded)} tensors loaded, {len(self.missing)} model tensors left "
            f"at init, {len(self.unexpected)} checkpoint tensors unused"
        )


def read_detr_checkpoint(source: str | Path) -> dict[str, Tensor]:
    """The DETR state dict of a local checkpoint file (``{"model": ...}`` or a bare state dict).

    ``source`` is a path, or a bare file name found in torch.hub's checkpoint cache (where
    ``torch.hub`` would have put ``detr-r50-e632da11.pth``). Nothing is downloaded, and the file
    is read with ``torch.load(weights_only=True)``: only tensors and plain containers unpickle.
    """
    path = Path(source).expanduser()
    if not path.is_file():
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(source).name
        if not cached.is_file():
            raise ModelError(
                f"DETR checkpoint {str(source)!r}: no such file (also looked in {cached.parent}). Download "
                f"{DETR_R50_FILE} from {DETR_R50_URL} and pass its local path; hub ids such as "
                "'facebook/detr-resnet-50' (Hugging Face layout) are not supported"
            )
        path = cached
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # weights_only refuses pickled objects that are not tensors
        raise ModelError(f"{path}: not a loadable DETR checkpoint of plain tensors ({error})") from error
    return _unwrap(checkpoint, str(path))


def _unwrap(checkpoint: object, where: str) -> dict[str, Tensor]:
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("model"), Mapping):
        checkpoint = checkpoint["model"]
    if not isinstance(checkpoint, Mapping) or not checkpoint:
        raise ModelError(f"{where}: expected {{'model': state_dict}} or a state dict, got {type(checkpoint).__name__}")
    # A checkpoint saved from a DistributedDataParallel wrapper prefixes every key.
    return {(key[len("module.") :] if key.startswith("module.") else key): value for key, value in checkpoint.items()}


def load_detr_checkpoint(model: HOIDetector, source: str | Path | Mapping[str, Tensor]) -> LoadReport:
    """Copy DETR weights into ``model`` (in place) as the module docstring's table says.

    ``source``: a checkpoint path (see ``read_detr_checkpoint``) or an already loaded
    ``{"model": state_dict}`` / state dict. Returns a ``LoadReport``; raises ``ModelError`` on a
    shape mismatch, naming the DETR key, the model key and both shapes.
    """
    detr_state = read_detr_checkpoint(source) if isinstance(source, (str, Path)) else _unwrap(source, "checkpoint")
    model_state = model.state_dict()
    routes = _routes(model)
    report = LoadReport()
    assigned: dict[str, Tensor] = {}
    for detr_key, value in detr_state.items():
        targets, transform = _route(detr_key, routes)
        targets = tuple(key for key in targets if key in model_state)
        if not isinstance(value, Tensor) or not targets:
            report.unexpected.append(detr_key)
            continue
        value = transform(detr_key, value)
        for target in targets:
            expected = model_state[target].shape
            if value.shape != expected:
                raise ModelError(
                    f"DETR checkpoint key {detr_key!r} -> model key {target!r}: checkpoint shape "
                    f"{tuple(value.shape)} does not fit model shape {tuple(expected)}"
                )
            assigned[target] = value  # load_state_dict copies into each target: clones stay independent
    model.load_state_dict(assigned, strict=False)
    report.loaded = sorted(assigned)
    report.missing = [key for key in model_state if key not in assigned]
    return report


# A route: DETR key -> (model keys, transform of the tensor).
_Transform = Callable[[str, Tensor], Tensor]
_Routes = tuple[dict[str, tuple[tuple[str, ...], _Transform]], list[tuple[str, tuple[str, ...]]]]


def _identity(detr_key: str, value: Tensor) -> Tensor:
    return value


def _routes(model: HOIDetector) -> _Routes:
    """Exact-key routes (with transforms) and prefix routes (copied as they are) for this model."""
    config = model.config
    three_branch = config.decoder.kind == "three-branch"
    decoder_prefixes = _THREE_BRANCHES if three_branch else ("decoder.transformer.",)
    query_keys = _THREE_BRANCH_QUERIES if three_branch else ("decoder.query_embed.weight",)
    num_queries = config.decoder.num_queries

    def first_queries(detr_key: str, value: Tensor) -> Tensor:
        if value.dim() != 2 or value.shape[0] < num_queries:
            raise ModelError(
                f"DETR checkpoint key {detr_key!r}: shape {tuple(value.shape)} has fewer than "
                f"num_queries={num_queries} rows to initialise the model's query tables from"
            )
        return value[:num_queries]

    exact: dict[str, tuple[tuple[str, ...], _Transform]] = {"query_embed.weight": (query_keys, first_queries)}
    if config.num_obj_classes == len(COCO_OBJECT_IDS):
        # Otherwise the classes are not COCO's and DETR's classifier rows mean nothing here.
        for suffix in ("weight", "bias"):
            exact[f"class_embed.{suffix}"] = ((f"decoder.heads.obj_class_embed.{suffix}",), _coco_rows)
    prefixes = [
        ("backbone.0.body.", ("backbone.body.",)),
        ("input_proj.", ("input_proj.",)),
        ("transformer.encoder.", ("encoder.",)),
        ("transformer.decoder.", decoder_prefixes),
        ("bbox_embed.", ("decoder.heads.sub_bbox_embed.", "decoder.heads.obj_bbox_embed.")),
    ]
    return exact, prefixes


def _route(detr_key: str, routes: _Routes) -> tuple[tuple[str, ...], _Transform]:
    """Model keys (possibly none) a DETR key goes to, and the transform applied on the way."""
    exact, prefixes = routes
    if detr_key in exact:
        return exact[detr_key]
    for detr_prefix, model_prefixes in prefixes:
        if detr_key.startswith(detr_prefix):
            rest = detr_key[len(detr_prefix) :]
            return tuple(prefix + rest for prefix in model_prefixes), _identity
    return (), _identity


def _coco_rows(detr_key: str, value: Tensor) -> Tensor:
    """DETR's classifier rows (one per COCO id 0..90, then no-object) -> our 80 classes + no-object."""
    needed = max(COCO_OBJECT_IDS) + 2
    if value.shape[0] < needed:
        raise ModelError(
            f"DETR checkpoint key {detr_key!r}: shape {tuple(value.shape)} has fewer than {needed} "
            "rows (one per COCO id 0..90 plus no-object) to pick the 80 COCO classes from"
        )
    rows = torch.tensor([*COCO_OBJECT_IDS, value.shape[0] - 1])
    return value[rows]
