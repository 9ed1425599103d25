"""Fine-tuning the teacher: negative sampling, the training forward, learning, exact resume, bad input.

Real parts only: tiny BLIP models these tests build and save, synthetic HICO-format data they
write, the real engine to load and score the result.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import BlipForImageTextRetrieval

from teacher_server.__main__ import main
from teacher_server.engine import EngineSettings, ImageSentences, ItmEngine, itm_start_token_id, load_blip_itm
from teacher_server.errors import FinetuneError, ModelLoadError
from teacher_server.finetune.checkpoint import CHECKPOINT_NAME
from teacher_server.finetune.cli import add_arguments
from teacher_server.finetune.examples import examples_from_annotations, examples_from_jsonl, sample_pairs
from teacher_server.finetune.objective import ImageStore, ItmTokens, itm_logits
from teacher_server.finetune.settings import FinetuneSettings
from teacher_server.finetune.training import SUMMARY_NAME, finetune
from teacher_server.hoi.classes import COCO_OBJECT_IDS, HICO_VERBS, OBJECT_NAMES
from teacher_server.hoi.errors import DatasetError
from teacher_server.itm_eval import evaluate_itm
from teacher_server.tiny_model import make_tiny_model

torch.set_num_threads(1)

# A learnable tiny teacher: BERT's initializer range (0.02) instead of the test model's 0.2.
TINY = {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "image_size": 32, "patch_size": 8}
FAST = {"lr": 1e-3, "warmup_steps": 0, "batch_images": 8, "device": "cpu", "num_threads": 1}


@pytest.fixture(scope="module")
def base_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("base"), seed=0, initializer_range=0.02, **TINY)


@pytest.fixture(scope="module")
def synthetic(synthetic_data) -> Path:
    return synthetic_data(32, 8, seed=0, max_people=1)


def train_examples(root: Path):
    return examples_from_annotations(root / "annotations" / "trainval_hico.json", root / "images" / "train")


# -- hand-made annotations ---------------------------------------------------------------------


def verb_id(name: str) -> int:
    return HICO_VERBS.index(name) + 1  # HICO-DET file verb ids are 1-based


def coco(name: str) -> int:
    return COCO_OBJECT_IDS[OBJECT_NAMES.index(name)]


def entry(file_name: str, objects: list[str], hois: list[tuple[int, str]], unknown: list[int] = ()) -> dict:
    """One person (box 0) and ``objects`` (boxes 1..); hois (object box, verb); unknown: object boxes."""
    boxes = [{"bbox": [2, 2, 30, 60], "category_id": 1}]
    boxes += [{"bbox": [30, 10 + 4 * i, 60, 40 + 4 * i], "category_id": coco(name)} for i, name in enumerate(objects)]
    result = {
        "file_name": file_name,
        "annotations": boxes,
        "hoi_annotation": [{"subject_id": 0, "object_id": box, "category_id": verb_id(verb)} for box, verb in hois],
    }
    if unknown:
        result["pairs_without_verbs"] = [{"subject_id": 0, "object_id": box} for box in unknown]
    return result


# a: rides and straddles a horse, and holds an unknown-verb pair with a cup.
# b: kicks a ball. c: only a pair without verbs (unusable). d: ignores a tv (no_interaction only).
HAND_MADE = [
    entry("a.jpg", ["horse", "cup"], [(1, "ride"), (1, "straddle")], unknown=[2]),
    entry("b.jpg", ["sports ball"], [(1, "kick")]),
    entry("c.jpg", ["kite"], [], unknown=[1]),
    entry("d.jpg", ["tv"], [(1, "no_interaction")]),
]


def write_annotations(directory: Path, entries: list[dict], name: str = "trainval_hico.json") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for item in entries:
        if not (directory / item["file_name"]).exists():
            Image.new("RGB", (64, 64), (120, 140, 160)).save(directory / item["file_name"])
    path = directory / name
    path.write_text(json.dumps(entries))
    return path


def sentence(verb: str, obj: str) -> str:
    article = "an" if obj[0] in "aeiou" else "a"
    return f"a person {verb.replace('_', ' ')} {article} {obj}"


# -- negative sampling --------------------------------------------------------------------------


def test_each_kind_of_negative_and_none_is_a_positive(tmp_path: Path) -> None:
    examples = examples_from_annotations(write_annotations(tmp_path, HAND_MADE), tmp_path)
    assert examples.skipped_images == 1  # c.jpg: its only pair has unknown verbs
    a, b, d = examples.images
    assert a.positives == (sentence("ride", "horse"), sentence("straddle", "horse"))
    assert b.positives == (sentence("kick", "sports ball"),) and not b.blocked
    cup_sentences = {sentence(verb, "cup") for verb in ("hold", "drink_with", "sip")}
    assert cup_sentences <= a.blocked  # the cup's verbs are unknown, not negative
    assert d.positives == () and sentence("watch", "tv") in d.hard_pools[0]

    settings = FinetuneSettings(same_object_negatives=3, other_object_negatives=3, swap_negatives=2, seed=5)
    by_image: dict[int, list] = {0: [], 1: [], 2: []}
    for epoch in range(6):
        for pair in sample_pairs(examples, [0, 1, 2], epoch=epoch, settings=settings):
            by_image[pair.image].append(pair)
    negatives = {index: {p.sentence for p in pairs if p.label == 0} for index, pairs in by_image.items()}
    for index, image in enumerate(examples.images):
        assert negatives[index], f"image {image.name} got no negatives"
        assert not negatives[index] & set(image.positives)
        assert not negatives[index] & image.blocked
    horse_negatives = {s for s in negatives[0] if s.endswith("a horse")}
    assert horse_negatives and horse_negatives <= set(a.hard_pools[0])  # (a) same object, valid verb
    # (b) other objects of the file, absent from the image: the ball or the tv, never the cup beside it.
    assert {s for s in negatives[0] if s.endswith(("sports ball", "a tv"))} - {sentence("kick", "sports ball")}
    assert not {s for s in negatives[0] if s.endswith("a cup")}
    assert sentence("kick", "sports ball") in negatives[0]  # (c) b's positive, swapped in
    assert negatives[2] & set(d.hard_pools[0])  # d denies verbs of its tv without positives


def test_seen_verb_negatives_are_verbs_other_images_have(synthetic: Path) -> None:
    # The synthetic world shows few of each object's valid verbs (kick, hold, inspect of a ball
    # among its ~10): (a') negatives come from those, so the teacher learns the confusable ones.
    examples = train_examples(synthetic)
    true_somewhere = {s for image in examples.images for s in image.positives}
    only_seen = FinetuneSettings(
        same_object_negatives=0, seen_verb_negatives=2, other_object_negatives=0, swap_negatives=0
    )
    drawn = set()
    for index, image in enumerate(examples.images):
        for pool, seen in zip(image.hard_pools, image.seen_pools, strict=True):
            assert set(seen) == set(pool) & true_somewhere
        negatives = {p.sentence for p in sample_pairs(examples, [index], epoch=0, settings=only_seen) if not p.label}
        assert negatives <= true_somewhere - set(image.positives)
        drawn |= negatives
    assert drawn, "the world has confusable verbs to draw"
    # The option changes what a step trains on.
    off = FinetuneSettings(seed=3, seen_verb_negatives=0)
    on = FinetuneSettings(seed=3, seen_verb_negatives=1)
    assert sample_pairs(examples, [1, 2], epoch=0, settings=off) != sample_pairs(examples, [1, 2], epoch=0, settings=on)


def test_sampling_is_a_function_of_seed_epoch_and_image(synthetic: Path) -> None:
    examples = train_examples(synthetic)
    settings = FinetuneSettings(seed=3)
    first = sample_pairs(examples, [4, 9, 2], epoch=1, settings=settings)
    assert first == sample_pairs(examples, [4, 9, 2], epoch=1, settings=settings)
    assert first != sample_pairs(examples, [4, 9, 2], epoch=2, settings=settings)
    # (a) and (b) of an image do not depend on which images share its batch, nor on its place there.
    own_only = FinetuneSettings(seed=3, swap_negatives=0)
    alone = [(p.sentence, p.label) for p in sample_pairs(examples, [2], epoch=1, settings=own_only)]
    elsewhere = sample_pairs(examples, [11, 2, 5], epoch=1, settings=own_only)
    assert [(p.sentence, p.label) for p in elsewhere if p.image == 1] == alone
    # Every positive of every image is present, every negative is false for its image.
    for pair in first:
        image = examples.images[[4, 9, 2][pair.image]]
        assert (pair.sentence in image.positives) == (pair.label == 1)
    assert {p.sentence for p in first if p.label} == {s for i in (4, 9, 2) for s in examples.images[i].positives}


# -- the training forward -----------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["cls", "enc"])
def test_training_forward_equals_stock_and_engine(base_model: Path, synthetic: Path, policy: str) -> None:
    loaded = load_blip_itm(base_model, revision=None, dtype=torch.float32)
    examples = train_examples(synthetic)
    pixels = ImageStore(examples, loaded.processor.image_processor, 64).pixels([0, 1])  # (2, 3, 32, 32)
    sentences = ["a person ride a horse", "a person hold a cup", "a person kick a sports ball", "a person"]
    image_index = torch.tensor([0, 1, 1, 0])
    tokens = ItmTokens(loaded.processor.tokenizer, policy, 64)
    input_ids, mask = tokens.batch(sentences)
    # Re-run with a perturbed model so that scores are not all equal (initializer 0.02 is nearly flat).
    with torch.no_grad():
        for parameter in loaded.model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
        ours = itm_logits(loaded.model.eval(), pixels, image_index, input_ids, mask)
        stock = BlipForImageTextRetrieval.forward(
            loaded.model, input_ids=input_ids, pixel_values=pixels[image_index], attention_mask=mask, use_itm_head=True
        ).itm_score
    torch.testing.assert_close(ours, stock, atol=1e-5, rtol=0)
    assert (ours[:, 1] - ours[:, 0]).std() > 1e-3  # the comparison is not between constants
    # The engine builds the same input ids (start token included): same margins.
    engine = ItmEngine(
        loaded.model,
        loaded.processor,
        model_id="perturbed",
        weights_identity="test",
        settings=EngineSettings(device="cpu", itm_start_token=policy),
    )
    images = [engine.prepare_image(examples.images[i].path.read_bytes()) for i in (0, 1)]
    scored = engine.score(
        [
            ImageSentences(images[int(i)].digest, images[int(i)], [s])
            for i, s in zip(image_index, sentences, strict=True)
        ]
    )
    margins = torch.tensor([row[0].match_logit for row in scored])
    torch.testing.assert_close(margins, (ours[:, 1] - ours[:, 0]).float(), atol=1e-4, rtol=0)


def test_the_itm_head_computes_in_fp32_under_autocast(base_model: Path, synthetic: Path) -> None:
    loaded = load_blip_itm(base_model, revision=None, dtype=torch.float32)
    examples = train_examples(synthetic)
    pixels = ImageStore(examples, loaded.processor.image_processor, 64).pixels([0])
    input_ids, mask = ItmTokens(loaded.processor.tokenizer, "cls", 64).batch(["a person ride a horse", "a person"])
    first: list[torch.Tensor] = []
    last_layer = loaded.model.text_encoder.encoder.layer[-1]
    last_layer.register_forward_hook(
        lambda module, args, output: first.append((output[0] if isinstance(output, tuple) else output)[:, 0])
    )
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = itm_logits(loaded.model.eval(), pixels, torch.tensor([0, 0]), input_ids, mask)
    head = loaded.model.itm_head
    assert logits.dtype == torch.float32
    assert torch.equal(logits, torch.nn.functional.linear(first[0].float(), head.weight, head.bias))


# -- learning -----------------------------------------------------------------------------------


def test_finetuning_lowers_the_loss_and_raises_auc(base_model: Path, synthetic: Path, tmp_path: Path) -> None:
    examples = train_examples(synthetic)
    out = tmp_path / "tuned"
    said: list[str] = []
    result = finetune(base_model, out, examples, FinetuneSettings(epochs=20, **FAST), progress=False, say=said.append)
    assert result.complete and result.steps == 20 * 4 == result.total_steps  # 32 images / 8 per step
    assert result.epoch_losses[-1] < 0.85 * result.epoch_losses[0]
    assert any(line.startswith("epoch 20/20: loss") for line in said)
    assert str(out) in said[-1] and result.fingerprint in said[-1]

    base = ItmEngine.from_pretrained(base_model, EngineSettings(device="cpu"))
    tuned = ItmEngine.from_pretrained(out, EngineSettings(device="cpu"))
    assert tuned.fingerprint == result.fingerprint != base.fingerprint
    annotations, images = synthetic / "annotations" / "trainval_hico.json", synthetic / "images" / "train"
    before = evaluate_itm(base, annotations, images, progress=False).summary()
    after = evaluate_itm(tuned, annotations, images, progress=False).summary()
    assert after["auc"] > max(0.8, before["auc"] + 0.2), (before, after)

    summary = json.loads((out / SUMMARY_NAME).read_text())
    assert summary["complete"] and summary["fingerprint"] == result.fingerprint
    assert summary["data"]["images"] == 32 and summary["settings"]["lr"] == FAST["lr"]
    assert [epoch["loss"] for epoch in summary["epochs"]] == result.epoch_losses
    assert not (out / CHECKPOINT_NAME).exists()  # the engine hashes *.pt files: none may stay


def test_same_seed_same_weights_and_exact_resume(base_model: Path, synthetic: Path, tmp_path: Path) -> None:
    examples = train_examples(synthetic)
    settings = FinetuneSettings(epochs=2, checkpoint_every=3, seed=7, **FAST)  # 8 steps
    straight = finetune(base_model, tmp_path / "straight", examples, settings, progress=False, say=lambda _: None)
    again = finetune(base_model, tmp_path / "again", examples, settings, progress=False, say=lambda _: None)

    out = tmp_path / "resumed"
    stop = FinetuneSettings(epochs=2, checkpoint_every=3, seed=7, max_steps=5, **FAST)
    stopped = finetune(base_model, out, examples, stop, progress=False, say=lambda _: None)
    assert not stopped.complete and stopped.steps == 5 and stopped.fingerprint is None
    checkpoint = torch.load(out / CHECKPOINT_NAME, weights_only=True)  # the safe unpickler reads it
    assert checkpoint["position"] == {"epoch": 1, "batches_done": 1, "step": 5}
    assert not (out / "model.safetensors").exists()
    with pytest.raises(FinetuneError, match="already holds a fine-tuning run"):
        finetune(base_model, out, examples, settings, progress=False, say=lambda _: None)
    resumed = finetune(base_model, out, examples, settings, resume=True, progress=False, say=lambda _: None)

    weights = load_file(tmp_path / "straight" / "model.safetensors")
    for other in (tmp_path / "again", out):
        held = load_file(other / "model.safetensors")
        assert all(torch.equal(weights[name], held[name]) for name in weights), other
    assert resumed.epoch_losses == straight.epoch_losses == again.epoch_losses
    assert resumed.fingerprint == straight.fingerprint
    # Resuming a finished run trains nothing and answers the same.
    finished = finetune(base_model, out, examples, settings, resume=True, progress=False, say=lambda _: None)
    assert finished.fingerprint == straight.fingerprint and finished.steps == 8


def test_resume_refuses_other_settings_or_data(base_model: Path, synthetic: Path, tmp_path: Path) -> None:
    examples = train_examples(synthetic)
    out = tmp_path / "run"
    finetune(base_model, out, examples, FinetuneSettings(max_steps=1, **FAST), progress=False, say=lambda _: None)
    with pytest.raises(FinetuneError, match=r"lr: 0\.0005 here vs 0\.001 in the checkpoint"):
        changed = {**FAST, "lr": 5e-4}
        finetune(base_model, out, examples, FinetuneSettings(**changed), resume=True, progress=False)
    entries = json.loads((synthetic / "annotations" / "trainval_hico.json").read_text())[:20]
    subset = write_annotations(tmp_path / "subset", entries)
    for item in entries:
        shutil.copy(synthetic / "images" / "train" / item["file_name"], tmp_path / "subset")
    other_data = examples_from_annotations(subset, tmp_path / "subset")
    with pytest.raises(FinetuneError, match=r"training data: 20 images .* vs 32 images"):
        finetune(base_model, out, other_data, FinetuneSettings(**FAST), resume=True, progress=False)
    # What a resume may change: how it runs, not what it computes.
    done = finetune(
        base_model,
        out,
        examples,
        FinetuneSettings(**{**FAST, "num_threads": 1}),
        resume=True,
        progress=False,
        say=lambda _: None,
    )
    assert done.complete


# -- the command line and bad input -------------------------------------------------------------


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["finetune", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_on_jsonl_pairs(base_model: Path, synthetic: Path, tmp_path: Path, capsys) -> None:
    images = synthetic / "images" / "train"
    rows = [
        {"image": "synth_train_000000.jpg", "sentence": "a person ride a horse", "label": 1},
        {"image": "synth_train_000000.jpg", "sentence": "a person kick a sports ball", "label": 0},
        {"image": str(images / "synth_train_000001.jpg"), "sentence": "a person hold a cup", "label": 1},
    ]
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("\n".join(json.dumps(row) for row in rows) + "\n\n")
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(
        capsys, "--jsonl", jsonl, "--images", images, "--model", base_model, "--out", out, "--epochs", "2",
        "--device", "cpu", "--threads", "1", "--lr", "3e-4", "--warmup-steps", "0", "--no-progress",
    )  # fmt: skip
    assert code == 0, stderr
    assert "epoch 2/2: loss" in stdout and "fingerprint" in stdout
    assert ItmEngine.from_pretrained(out, EngineSettings(device="cpu")).fingerprint in stdout
    examples = examples_from_jsonl(jsonl, images)
    assert [image.positives for image in examples.images] == [("a person ride a horse",), ("a person hold a cup",)]
    assert examples.images[0].given_negatives == ("a person kick a sports ball",)


def test_malformed_jsonl_names_lines_and_fields(synthetic: Path, tmp_path: Path) -> None:
    images = synthetic / "images" / "train"
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text(
        '{"image": "synth_train_000000.jpg", "sentence": "a person ride a horse", "label": 1}\n'
        "{not json\n"
        '{"image": "synth_train_000000.jpg", "sentence": "", "label": 1}\n'
        '{"image": "synth_train_000000.jpg", "sentence": "a person hold a cup", "label": 2}\n'
        '{"image": "nowhere.jpg", "sentence": "a person hold a cup", "label": 1}\n'
        '["a list"]\n'
        '{"image": "synth_train_000000.jpg", "sentence": "a person ride a horse", "label": 0}\n'
    )
    with pytest.raises(FinetuneError) as caught:
        examples_from_jsonl(jsonl, images)
    message = str(caught.value)
    assert "bad.jsonl: 6 problem(s)" in message
    assert "line 2: not valid JSON" in message
    assert "line 3: sentence = ''" in message
    assert "line 4: label = 2, expected 0 (no match) or 1 (match)" in message
    assert f"line 5: image = 'nowhere.jpg': file {images / 'nowhere.jpg'} does not exist" in message
    assert "line 6: expected an object" in message
    assert "line 7: label = 0 contradicts line 1" in message
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(FinetuneError, match=r"empty\.jsonl: no rows"):
        examples_from_jsonl(empty, images)


def test_bad_annotations_are_named(tmp_path: Path) -> None:
    missing = write_annotations(tmp_path / "m", [entry("gone.jpg", ["horse"], [(1, "ride")])])
    (tmp_path / "m" / "gone.jpg").unlink()
    with pytest.raises(DatasetError, match=r"entry 0 \(gone\.jpg\).*gone\.jpg does not exist"):
        examples_from_annotations(missing, tmp_path / "m")
    empty = tmp_path / "e" / "trainval_hico.json"
    empty.parent.mkdir()
    empty.write_text("[]")
    with pytest.raises(FinetuneError, match=r"trainval_hico\.json: the annotation file lists no images"):
        examples_from_annotations(empty, empty.parent)
    useless = write_annotations(tmp_path / "u", [HAND_MADE[2]])
    with pytest.raises(FinetuneError, match="none of its 1 images has a usable pair"):
        examples_from_annotations(useless, tmp_path / "u")
    bad_verb = [entry("a.jpg", ["horse"], [(1, "ride")])]
    bad_verb[0]["hoi_annotation"][0]["category_id"] = 999
    unknown = write_annotations(tmp_path / "v", bad_verb)
    with pytest.raises(DatasetError, match=r"hoi_annotation\[0\]\.category_id = 999 is outside 1\.\.117"):
        examples_from_annotations(unknown, tmp_path / "v")


def test_the_box_policy_reaches_the_annotation_reader(tmp_path: Path) -> None:
    # A horse box 6 px past the right edge of its 64 px image: error names it, clamp trains on.
    entries = copy.deepcopy(HAND_MADE[:2])
    entries[0]["annotations"][1]["bbox"] = [30, 10, 70, 40]
    path = write_annotations(tmp_path, entries)
    with pytest.raises(DatasetError, match=r"annotations\[1\]\.bbox .* lies outside the 64x64"):
        examples_from_annotations(path, tmp_path)
    with pytest.warns(UserWarning, match="box_policy=clamp: 1 box clamped into its image"):
        examples = examples_from_annotations(path, tmp_path, box_policy="clamp")
    assert len(examples.images) == 2
    parser = argparse.ArgumentParser()
    add_arguments(parser)  # finetune's flags: --box-policy, clamp by default as in training
    assert parser.get_default("box_policy") == "clamp"


def test_cli_errors_exit_2_with_the_cause(base_model: Path, tmp_path: Path, capsys) -> None:
    annotations = write_annotations(tmp_path / "data", HAND_MADE)
    common = ("--annotations", annotations, "--images", tmp_path / "data", "--device", "cpu", "--no-progress")
    code, _, err = run_cli(capsys, *common, "--model", tmp_path / "no-model", "--out", tmp_path / "o1")
    assert code == 2 and err.startswith("finetune: model directory") and "no-model" in err
    code, _, err = run_cli(capsys, *common, "--model", base_model, "--out", tmp_path / "o2", "--lr", "0")
    assert code == 2 and "finetune: lr = 0.0 is outside (0.0, 1.0]" in err
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    code, _, err = run_cli(capsys, *common, "--model", base_model, "--out", occupied)
    assert code == 2 and "is not empty and holds no fine-tuning run (notes.txt)" in err
    code, _, err = run_cli(
        capsys, "--annotations", tmp_path / "none.json", "--images", tmp_path, "--out", tmp_path / "o3"
    )
    assert code == 2 and "annotation file" in err and "none.json does not exist" in err


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("epochs", 0, "epochs = 0 is outside [1, 10000]"),
        ("batch_images", 2.5, "batch_images = 2.5, expected an integer"),
        ("swap_negatives", -1, "swap_negatives = -1 is outside [0, 64]"),
        ("prompt_variant", "poem", "prompt_variant = 'poem', expected one of full, verb, object"),
        ("device", "tpu", "device = 'tpu', expected auto, cpu, cuda or cuda:N"),
        ("precision", "fp8", "precision = 'fp8', expected one of auto, fp32, bf16, fp16"),
        ("max_steps", 0, "max_steps = 0 is outside [1, 10000000000]"),
        ("lr", True, "lr = True, expected a number in (0.0, 1.0]"),
        ("lr", float("nan"), "lr = nan, expected a number in (0.0, 1.0]"),
        ("epochs", True, "epochs = True, expected an integer in [1, 10000]"),
        ("negatives", 2, "negatives: not a setting (the settings are epochs, batch_images,"),
    ],
)
def test_settings_name_the_field_and_range(field: str, value: object, message: str) -> None:
    with pytest.raises(FinetuneError, match=re.escape(message)):
        FinetuneSettings(**{field: value})


def test_settings_report_every_problem_and_keep_their_types() -> None:
    with pytest.raises(FinetuneError) as raised:
        FinetuneSettings(epochs=0, lr=-1.0)
    assert str(raised.value) == "epochs = 0 is outside [1, 10000]; lr = -1.0 is outside (0.0, 1.0]"
    # An int is a number (stored as a float, so a checkpoint's settings compare equal on resume).
    settings = FinetuneSettings(lr=1, grad_clip=0)
    assert settings.to_dict()["lr"] == 1.0 and isinstance(settings.lr, float)
    assert FinetuneSettings(**settings.to_dict()) == settings


def test_mixed_precision_needs_cuda(base_model: Path, tmp_path: Path) -> None:
    examples = examples_from_annotations(write_annotations(tmp_path / "d", HAND_MADE), tmp_path / "d")
    with pytest.raises(FinetuneError, match="precision = 'bf16' needs a CUDA device"):
        finetune(base_model, tmp_path / "o", examples, FinetuneSettings(device="cpu", precision="bf16"), progress=False)


def test_a_learnable_tiny_teacher_from_the_command_line(tmp_path: Path, capsys) -> None:
    flags = ["--hidden-size", "64", "--layers", "2", "--heads", "4", "--image-size", "64", "--patch-size", "16"]
    assert main(["make-tiny-model", str(tmp_path / "m"), *flags, "--initializer-range", "0.02"]) == 0
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["vision_config"]["num_attention_heads"] == config["text_config"]["num_attention_heads"] == 4
    assert (config["vision_config"]["patch_size"], config["initializer_range"]) == (16, 0.02)
    assert main(["make-tiny-model", str(tmp_path / "bad"), "--hidden-size", "64", "--heads", "3"]) == 2
    assert "--hidden-size 64 is not divisible by --heads 3" in capsys.readouterr().out
    # The start-token policy that training and scoring share.
    tokenizer = load_blip_itm(tmp_path / "m", revision=None, dtype=torch.float32).processor.tokenizer
    assert itm_start_token_id(tokenizer, "cls") is None
    assert itm_start_token_id(tokenizer, "enc") == tokenizer.convert_tokens_to_ids("[ENC]")
    with pytest.raises(ModelLoadError, match="itm_start_token must be 'cls' or 'enc'"):
        itm_start_token_id(tokenizer, "bos")
