"""Fine-tuning on pair regions (``finetune --region crop|mask``): one example per pair, the other
pair's verbs as its hard negatives, pixels rendered exactly as the engine renders the region, and
an exact resume; whole-image runs sample what they sampled before regions existed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from teacher_server.__main__ import main
from teacher_server.engine import EngineSettings, ItmEngine, load_blip_itm
from teacher_server.errors import FinetuneError
from teacher_server.finetune.examples import examples_from_annotations, sample_pairs
from teacher_server.finetune.objective import ImageStore
from teacher_server.finetune.settings import LATER_SETTINGS, FinetuneSettings
from teacher_server.finetune.training import finetune
from teacher_server.hoi.region import Region
from teacher_server.tiny_model import make_tiny_model

torch.set_num_threads(1)

TINY = {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "image_size": 32, "patch_size": 8}
FAST = {"lr": 1e-3, "warmup_steps": 0, "batch_images": 4, "device": "cpu", "num_threads": 1}


@pytest.fixture(scope="module")
def base_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("base"), seed=0, initializer_range=0.02, **TINY)


@pytest.fixture(scope="module")
def two_person(synthetic_data) -> Path:
    # Every corpus image is a two-person one: two pairs with objects of one class.
    return synthetic_data(0, 0, seed=5, corpus=6, two_person_rate=1.0)


def corpus(root: Path, *, regions: bool):
    return examples_from_annotations(
        root / "annotations" / "corpus_hico.json", root / "images" / "corpus", regions=regions
    )


def test_one_example_per_pair_with_the_other_pairs_verbs_as_negatives(two_person: Path) -> None:
    images, pairs = corpus(two_person, regions=False), corpus(two_person, regions=True)
    entries = json.loads((two_person / "annotations" / "corpus_hico.json").read_text())
    assert len(images.images) == len(entries) and not images.regions and pairs.regions
    assert len(pairs.images) > len(images.images)  # two pairs in (nearly) every image
    assert all(image.region is None and not image.pair_pool for image in images.images)
    first = entries[0]
    of_first = [example for example in pairs.images if example.name == first["file_name"]]
    assert len(of_first) == 2
    for example, other in (of_first, of_first[::-1]):
        # Its own verbs only; the other person's verbs are (d) negatives and in its (a) pool.
        assert example.positives and not set(example.positives) & set(other.positives)
        assert set(example.pair_pool) == set(other.positives)
        assert set(other.positives) <= set(example.hard_pools[0])
    # The region is the pair's human box and object box from the file.
    boxes = [annotation["bbox"] for annotation in first["annotations"]]
    hoi = first["hoi_annotation"][0]
    assert of_first[0].region == Region.from_values([*boxes[hoi["subject_id"]], *boxes[hoi["object_id"]]])
    # (d) draws the other pair's verbs, from its own stream: (a)-(c) are those it would draw without.
    settings = FinetuneSettings(other_pair_negatives=2, same_object_negatives=0, seen_verb_negatives=0)
    batch = [pairs.images.index(of_first[0])]
    drawn = {p.sentence for p in sample_pairs(pairs, batch, epoch=0, settings=settings) if p.label == 0}
    assert set(of_first[1].positives) <= drawn
    with_d = FinetuneSettings(other_pair_negatives=3)
    without_d = FinetuneSettings(other_pair_negatives=0)
    for index in range(len(pairs.images)):
        ours = [p.sentence for p in sample_pairs(pairs, [index], epoch=1, settings=with_d)]
        theirs = [p.sentence for p in sample_pairs(pairs, [index], epoch=1, settings=without_d)]
        assert ours[: len(theirs)] == theirs
    # Whole images draw no (d): the count changes nothing, the digest is the one it always was.
    every = list(range(len(images.images)))
    assert sample_pairs(images, every, epoch=0, settings=with_d) == sample_pairs(
        images, every, epoch=0, settings=without_d
    )
    assert images.digest() != pairs.digest()


@pytest.mark.parametrize(("policy", "margin", "dim"), [("crop", 0.25, 0.8), ("mask", 0.1, 0.5)])
def test_examples_are_rendered_as_the_engine_renders_the_region(
    base_model: Path, two_person: Path, policy: str, margin: float, dim: float
) -> None:
    pairs = corpus(two_person, regions=True)
    settings = FinetuneSettings(region=policy, region_margin=margin, region_dim=dim)
    processor = load_blip_itm(base_model, revision=None, dtype=torch.float32).processor.image_processor
    store = ImageStore(pairs, processor, 64, settings.engine_region())
    engine = ItmEngine.from_pretrained(base_model, EngineSettings(device="cpu", **settings.engine_region()))
    whole = ItmEngine.from_pretrained(base_model, EngineSettings(device="cpu"))
    for index in (0, 1):
        example = pairs.images[index]
        data = example.path.read_bytes()
        expected = engine.prepare_image(data, region=example.region).pixel_values[0]
        assert torch.equal(store.pixels([index])[0], expected)
        # Not the whole image's pixels: the comparison is about the region.
        assert not torch.equal(expected, whole.prepare_image(data).pixel_values[0])
    with pytest.raises(FinetuneError, match="give the region policy"):
        ImageStore(pairs, processor, 64)


def test_a_region_outside_its_image_names_the_example(base_model: Path, two_person: Path) -> None:
    pairs = corpus(two_person, regions=True)
    first = pairs.images[0]
    moved = type(first)(**{**first.__dict__, "region": Region(first.region.human, (1.0, 1.0, 999.0, 20.0))})
    broken = type(pairs)(**{**pairs.__dict__, "images": (moved,)})
    processor = load_blip_itm(base_model, revision=None, dtype=torch.float32).processor.image_processor
    store = ImageStore(broken, processor, 64, FinetuneSettings(region="crop").engine_region())
    with pytest.raises(FinetuneError, match=r"corpus_hico.json entry 0 .* pair 0: .*region\[6\]: is 999"):
        store.pixels([0])


def test_region_runs_resume_exactly_and_refuse_a_mismatch(base_model: Path, two_person: Path, tmp_path: Path) -> None:
    pairs, images = corpus(two_person, regions=True), corpus(two_person, regions=False)
    settings = FinetuneSettings(epochs=2, checkpoint_every=2, seed=3, region="mask", region_dim=0.6, **FAST)
    quiet = {"progress": False, "say": lambda _: None}
    straight = finetune(base_model, tmp_path / "straight", pairs, settings, **quiet)
    stop = FinetuneSettings(**{**settings.to_dict(), "max_steps": 3})
    assert not finetune(base_model, tmp_path / "resumed", pairs, stop, **quiet).complete
    resumed = finetune(base_model, tmp_path / "resumed", pairs, settings, resume=True, **quiet)
    weights, held = (load_file(tmp_path / name / "model.safetensors") for name in ("straight", "resumed"))
    assert all(torch.equal(weights[name], held[name]) for name in weights)
    assert resumed.epoch_losses == straight.epoch_losses
    # The fingerprint is the one an engine serving the run's region policy computes.
    served = ItmEngine.from_pretrained(tmp_path / "straight", EngineSettings(region_policy="mask", region_dim=0.6))
    assert straight.fingerprint == served.fingerprint
    summary = json.loads((tmp_path / "straight" / "finetune.json").read_text())
    assert summary["settings"]["region"] == "mask" and summary["data"]["unit"] == "pair region"
    # Another policy is another run; examples must match the region setting.
    with pytest.raises(FinetuneError, match="region: 'crop' here vs 'mask'"):
        other = FinetuneSettings(**{**settings.to_dict(), "region": "crop"})
        finetune(base_model, tmp_path / "straight", pairs, other, resume=True, **quiet)
    with pytest.raises(FinetuneError, match="region = 'mask' but the examples are whole images"):
        finetune(base_model, tmp_path / "new", images, settings, **quiet)
    with pytest.raises(FinetuneError, match="region = 'image' but the examples are pair regions"):
        finetune(base_model, tmp_path / "new", pairs, FinetuneSettings(**FAST), **quiet)


def test_runs_written_before_regions_resume_as_whole_image_runs() -> None:
    older = {key: value for key, value in FinetuneSettings().to_dict().items() if key not in LATER_SETTINGS}
    assert FinetuneSettings().differences(older) == []
    assert FinetuneSettings(region="crop").differences(older) == ["region: 'crop' here vs 'image' in the checkpoint"]


def test_region_settings_and_flags(base_model: Path, two_person: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(FinetuneError, match=r"region = 'blur', expected one of image, crop, mask"):
        FinetuneSettings(region="blur")
    with pytest.raises(FinetuneError, match=r"region_dim = 1.5 is outside \[0.0, 1.0\]"):
        FinetuneSettings(region_dim=1.5)
    annotations, images = two_person / "annotations" / "corpus_hico.json", two_person / "images" / "corpus"
    out = tmp_path / "cli"
    code = main([
        "finetune", "--annotations", str(annotations), "--images", str(images), "--model", str(base_model),
        "--out", str(out), "--region", "crop", "--region-margin", "0.2", "--epochs", "1", "--batch-images", "8",
        "--device", "cpu", "--threads", "1", "--warmup-steps", "0", "--no-progress",
    ])  # fmt: skip
    stdout = capsys.readouterr().out
    assert code == 0
    assert "--region-policy crop --region-margin 0.2" in stdout
    settings = json.loads((out / "finetune.json").read_text())["settings"]
    assert (settings["region"], settings["region_margin"], settings["other_pair_negatives"]) == ("crop", 0.2, 2)
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text(json.dumps({"image": str(next(images.iterdir())), "sentence": "a person", "label": 1}) + "\n")
    code = main([
        "finetune", "--jsonl", str(jsonl), "--images", str(images), "--out", str(tmp_path / "j"), "--region", "mask",
    ])  # fmt: skip
    assert code == 2
    assert capsys.readouterr().err.strip() == "finetune: --region mask needs --annotations (JSONL rows name no boxes)"
