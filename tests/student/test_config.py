"""The typed training config: recipe files, overrides, validation messages."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from testkit import REPO

from student.config import (
    ConfigError,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    load_config,
)

CONFIGS = REPO / "student" / "configs"


def test_hico_recipe_is_the_papers() -> None:
    config = load_config(CONFIGS / "hico.yaml")
    assert config.data.dataset == "hico"
    assert config.model.num_verbs == 117
    assert config.model.decoder.kind == "three-branch"
    assert config.model.decoder.num_queries == 64
    assert config.model.decoder.share_fusion is False
    assert config.model.backbone.depth == 50 and config.model.backbone.train_backbone
    assert (config.model.transformer.num_encoder_layers, config.model.transformer.num_decoder_layers) == (6, 6)
    assert (config.optim.lr, config.optim.backbone_lr, config.optim.weight_decay) == (1e-4, 1e-5, 1e-4)
    assert config.optim.batch_size == 4
    assert (config.schedule.epochs, config.schedule.lr_drop) == (100, [60])
    assert config.distill.variant == "soft" and config.teacher.enabled
    assert (config.loss.cost_bbox, config.loss.bbox, config.loss.eos_coef) == (2.5, 2.5, 0.1)
    assert config.pretrained is not None and config.pretrained.endswith("detr-r50-e632da11.pth")


def test_vcoco_recipe_freezes_the_cnn_and_uses_100_queries() -> None:
    config = load_config(CONFIGS / "vcoco.yaml")
    assert config.data.dataset == "vcoco"
    assert config.model.num_verbs == 29
    assert config.model.decoder.num_queries == 100
    assert config.model.decoder.share_fusion is True
    assert config.model.backbone.train_backbone is False
    assert config.optim.lr == 4e-5
    assert config.data.correspondence.endswith("corre_vcoco.npy")
    assert (config.schedule.epochs, config.schedule.lr_drop) == (100, [60])


def test_demo_config_is_small() -> None:
    config = load_config(CONFIGS / "demo.yaml")
    assert config.model.transformer.d_model <= 128
    assert config.model.backbone.depth == 18
    assert max(config.data.scales) <= 256


def test_no_file_gives_the_defaults() -> None:
    assert load_config(None) == TrainConfig()


def test_overrides_set_nested_values_parsed_as_yaml(tmp_path: Path) -> None:
    config = load_config(
        CONFIGS / "hico.yaml",
        [
            "optim.lr=2e-4",  # PyYAML alone would read this as a string
            "schedule.lr_drop=[30, 40]",
            "model.decoder.num_queries=16",
            "pretrained=null",
            "run.num_threads=2",
            "data.root=/somewhere/else",
        ],
    )
    assert config.optim.lr == 2e-4
    assert config.schedule.lr_drop == [30, 40]
    assert config.model.decoder.num_queries == 16
    assert config.pretrained is None
    assert config.run.num_threads == 2
    assert config.data.path("train_annotations") == Path("/somewhere/else/annotations/trainval_hico.json")


def test_absolute_paths_are_kept() -> None:
    config = load_config(None, ["data.train_images=/abs/images"])
    assert config.data.path("train_images") == Path("/abs/images")


# demo.yaml as the dataclass version of this module (commit 766e281) wrote it into config.yaml and,
# as a dict, into every checkpoint: runs made before the move to pydantic must keep loading.
# (Its distill values follow demo.yaml's current recipe; the layout is the dataclass version's.)
DEMO_WRITTEN_BY_THE_DATACLASS_VERSION = """
data:
  dataset: hico
  root: runs/demo/data
  train_images: images/train
  train_annotations: annotations/trainval_hico.json
  test_images: images/test
  test_annotations: annotations/test_hico.json
  correspondence: annotations/corre_hico.npy
  scales: [128]
  max_size: 200
  test_scale: 128
  crop: false
  color_jitter: 0.0
  max_pairs: null
  num_workers: 0
  box_policy: clamp
model:
  backbone: {depth: 18, base_width: 16, train_backbone: true}
  transformer: {d_model: 64, nhead: 4, dim_feedforward: 128, dropout: 0.0, num_encoder_layers: 2,
    num_decoder_layers: 2}
  decoder: {kind: single, num_queries: 2, share_fusion: false}
  num_verbs: 117
  num_obj_classes: 80
loss: {cost_obj_class: 1.0, cost_verb_class: 1.0, cost_bbox: 2.5, cost_giou: 1.0, bbox: 2.5,
  giou: 1.0, obj_class: 1.0, verb_class: 1.0, eos_coef: 0.1, aux_loss: true}
distill: {variant: soft, lambda_itm: 1.0, tau: 1.0, alpha: 1.0, top_k: 8, score_threshold: 0.2,
  confidence: 0.8, prompt_variant: full}
optim: {lr: 0.001, backbone_lr: 0.0002, weight_decay: 0.0001, batch_size: 16, clip_max_norm: 0.1,
  amp: true, amp_dtype: auto}
schedule:
  epochs: 60
  lr_drop: [50]
  lr_gamma: 0.1
  max_steps: null
teacher: {source: local, model: Salesforce/blip-itm-base-coco, device: auto, dtype: auto, itm_start_token: cls,
  timeout_s: 60.0, on_error: skip, token_env: HOIDISTILL_AUTH_TOKEN, memo_entries: 2000000,
  redis_url: null, prefetch: 2, deadline_s: 10.0}
eval: {top_k: 100, nms_threshold: null, nms_order: top_k_first, vcoco_no_object_role: true,
  batch_size: 8}
run: {output_dir: runs/demo/train, seed: 0, device: auto, num_threads: 2, log_every: 10, eval_every: 0,
  eval_at_end: true, progress: true, tf32: true}
pretrained: null
calibrate_bn_images: 64
"""


def test_configs_written_before_pydantic_still_load() -> None:
    written = yaml.safe_load(DEMO_WRITTEN_BY_THE_DATACLASS_VERSION)
    config = load_config(CONFIGS / "demo.yaml")
    assert config_from_dict(written) == config
    # A checkpoint written today holds the same dict, plus the keys added since at their defaults.
    added = {"teacher": {**written["teacher"], "region": "image"}, "run": {**written["run"], "tensorboard": True}}
    assert config.to_dict() == {**written, **added}


def test_round_trip_through_a_dict_and_yaml(tmp_path: Path) -> None:
    config = load_config(CONFIGS / "vcoco.yaml", ["optim.lr=3e-5"])
    assert config_from_dict(config.to_dict()) == config
    path = tmp_path / "again.yaml"
    path.write_text(config.to_yaml())
    assert load_config(path) == config


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("optim.lrr=1", "optim.lrr"),
        ("nonsense.key=1", "nonsense"),
        ("optim.lr=fast", "optim.lr: got 'fast', expected a number"),
        ("optim.lr=-1", "optim.lr: got -1, expected > 0"),  # the value as written
        ("optim.batch_size=2.5", "optim.batch_size: got 2.5, expected an integer"),
        ("run.progress=maybe", "run.progress: got 'maybe', expected true, false or always"),
        ("distill.variant=cosine", "distill.variant: got 'cosine', expected 'kl', 'margin' or 'soft'"),
        ("distill.tau=0", "distill.tau: must be > 0"),
        ("model.backbone.depth=7", "model.backbone.depth"),
        ("model.transformer.nhead=5", "model.transformer.nhead"),
        ("teacher.source=http://x", "teacher.source: got 'http://x'"),
        ("run.device=tpu", "run.device"),
        ("schedule.lr_drop=5", "schedule.lr_drop: got 5, expected a list"),
        ("schedule.lr_drop=[0]", "schedule.lr_drop"),
        ("data.scales=[]", "data.scales: got [], expected at least 1 item"),
        ("model.num_verbs=29", "model.num_verbs: got 29, but data.dataset='hico' has 117 verbs"),
        ("optim=3", "optim: expected a mapping"),
        ("data.max_size=100", "data.max_size: got 100, expected >= max(scales) = 800"),
        ("teacher.source=5", "teacher.source: got 5, expected a string"),
        ("teacher.region=box", "teacher.region: got 'box', expected 'image' or 'pair'"),
        ("calibrate_bn_images=8", "calibrate_bn_images: a pretrained backbone keeps its batch-norm statistics"),
        ("calibrate_bn_images=-1", "calibrate_bn_images: got -1, expected >= 0"),
        ("data.max_pairs=65", "data.max_pairs: got 65, but model.decoder.num_queries=64"),
    ],
)
def test_bad_values_name_the_key(override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(CONFIGS / "hico.yaml", [override])
    assert expected in str(caught.value)
    assert "hico.yaml" in str(caught.value)  # and the file it came with


@pytest.mark.parametrize("override", ["novalue", "=3", "a..b=1", "optim.lr.x=1"])
def test_malformed_overrides_are_refused(override: str) -> None:
    with pytest.raises(ConfigError, match=r"override|optim\.lr"):
        load_config(None, [override])


def test_apply_overrides_creates_sections() -> None:
    raw: dict = {}
    apply_overrides(raw, ["a.b.c=1", "a.d=[1, 2]", "e=text"])
    assert raw == {"a": {"b": {"c": 1}, "d": [1, 2]}, "e": "text"}


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML"):
        load_config(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        load_config(listing)


def test_unknown_key_in_a_file_lists_the_known_ones(tmp_path: Path) -> None:
    path = tmp_path / "typo.yaml"
    path.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert "optim.learning_rate" in message and "'lr'" in message


def test_teacher_region_defaults_to_the_whole_image() -> None:
    assert load_config(None).teacher.region == "image"
    assert load_config(None, ["teacher.region=pair"]).teacher.region == "pair"


def test_teacher_sources() -> None:
    assert not load_config(None, ["teacher.source=none"]).teacher.enabled
    assert load_config(None, ["teacher.source=local"]).teacher.enabled
    assert load_config(None, ["teacher.source=grpc://host:50051"]).teacher.source == "grpc://host:50051"


def test_loss_config_builds_matcher_and_weights() -> None:
    config = load_config(None, ["loss.cost_giou=2", "loss.verb_class=2"])
    assert config.loss.matcher().cost_giou == 2.0
    assert config.loss.weights().verb_class == 2.0
    assert config.distill.settings().variant == "soft"


def test_every_problem_is_named_at_once() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, ["optim.lrr=1", "optim.lr=-1", "run.seed=x"])
    message = str(caught.value)
    assert "unknown key(s) optim.lrr" in message
    assert "optim.lr: got -1, expected > 0" in message and "run.seed: got 'x', expected an integer" in message


def test_a_section_built_alone_names_its_keys_in_full() -> None:
    from student.config import OptimConfig

    with pytest.raises(ConfigError, match=r"optim\.lr: got 0, expected > 0"):
        OptimConfig(lr=0)
    assert OptimConfig(lr=1).lr == 1.0 and isinstance(OptimConfig(lr=1).lr, float)  # an int where a float goes
