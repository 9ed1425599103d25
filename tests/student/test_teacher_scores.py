"""The trainer's teacher adapter, with a real tiny BLIP in-process and a real gRPC teacher."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from student.losses import MarginTriplets
from student.losses.distill import TEACHER_KEY
from student.teacher import GrpcTeacher, LocalTeacher, TeacherScores, build_backend
from student.teacher.scores import pair_region
from teacher_server.engine import EngineSettings, ImageSentences, ItmEngine
from teacher_server.errors import TeacherError
from teacher_server.hoi.classes import HICO_VERBS, NO_INTERACTION_INDEX, OBJECT_NAMES, hico_correspondence
from teacher_server.hoi.digest import image_digest
from teacher_server.hoi.prompts import candidate_sentences, triplet_sentence
from teacher_server.hoi.region import Region

HORSE = OBJECT_NAMES.index("horse")
CUP = OBJECT_NAMES.index("cup")
NO_OBJECT = 80


@pytest.fixture
def images(tmp_path: Path) -> Path:
    for index, color in enumerate(((200, 30, 30), (30, 200, 30))):
        Image.new("RGB", (48, 40), color).save(tmp_path / f"img{index}.png")
    return tmp_path


def _target(root: Path, name: str, obj_labels: list[int]) -> dict:
    return {
        "file_name": name,
        "image_digest": image_digest((root / name).read_bytes()),
        "obj_labels": torch.tensor(obj_labels),
        "verb_labels": torch.zeros(len(obj_labels), len(HICO_VERBS)),
    }


def _adapter(backend, root: Path, **kwargs) -> TeacherScores:
    return TeacherScores(backend, verbs=HICO_VERBS, correspondence=hico_correspondence(), image_root=root, **kwargs)


def _direct(engine: ItmEngine, path: Path, sentences: list[str]) -> list[float]:
    prepared = engine.prepare_image(path.read_bytes())
    return [s.match_logit for s in engine.score([ImageSentences(prepared.digest, prepared, sentences)])[0]]


def test_margins_are_the_engines_scores_at_candidates_and_nan_elsewhere(engine: ItmEngine, images: Path) -> None:
    teacher = _adapter(LocalTeacher(engine), images)
    targets = [_target(images, "img0.png", [HORSE, CUP, HORSE]), _target(images, "img1.png", [CUP])]
    assert teacher.annotate(targets) == 4
    correspondence = hico_correspondence()
    for target in targets:
        margin = target[TEACHER_KEY]
        assert margin.shape == (len(target["obj_labels"]), len(HICO_VERBS))
        for row, obj in enumerate(target["obj_labels"].tolist()):
            candidates = candidate_sentences(obj, correspondence, HICO_VERBS)
            expected = _direct(engine, images / target["file_name"], [s for _, s in candidates])
            verbs = [v for v, _ in candidates]
            assert torch.allclose(margin[row, verbs], torch.tensor(expected), atol=1e-5)
            others = torch.ones(len(HICO_VERBS), dtype=torch.bool)
            others[verbs] = False
            assert torch.isnan(margin[row, others]).all()
            # no_interaction is valid with every object but has no sentence
            assert correspondence[NO_INTERACTION_INDEX, obj] and math.isnan(margin[row, NO_INTERACTION_INDEX])
    # Rows of the same object in one image are the same scores.
    assert torch.equal(targets[0][TEACHER_KEY][0].nan_to_num(), targets[0][TEACHER_KEY][2].nan_to_num())


def test_plan_lists_each_images_candidate_sentences_once(images: Path) -> None:
    teacher = _adapter(None, images)
    plan = teacher.plan([_target(images, "img0.png", [HORSE, HORSE]), _target(images, "img1.png", [NO_OBJECT])])
    first, second = plan.queries
    assert first is not None and second is None  # "no object" has no candidates
    expected = [s for _, s in candidate_sentences(HORSE, hico_correspondence(), HICO_VERBS)]
    assert list(first.sentences) == expected
    assert "a person ride a horse" in first.sentences
    assert first.image_path == images / "img0.png"


def test_the_memo_serves_repeated_batches(engine: ItmEngine, images: Path) -> None:
    teacher = _adapter(LocalTeacher(engine), images)
    teacher.annotate([_target(images, "img0.png", [CUP])])
    scored = teacher.stats.pairs_scored
    assert scored == len(teacher.sentences_of_object(CUP)) > 0
    again = [_target(images, "img0.png", [CUP])]
    teacher.annotate(again)
    assert teacher.stats.pairs_scored == scored  # nothing new went to the teacher
    assert teacher.stats.memo_hits == scored
    assert torch.isfinite(again[0][TEACHER_KEY]).sum() == scored


def test_prefetch_scores_ahead(engine: ItmEngine, images: Path) -> None:
    teacher = _adapter(LocalTeacher(engine), images)
    teacher.prefetch([_target(images, "img1.png", [HORSE])])
    before = teacher.stats.pairs_scored
    teacher.annotate([_target(images, "img1.png", [HORSE])])
    assert before > 0 and teacher.stats.pairs_scored == before


def test_an_image_the_engine_holds_is_not_read_again(tiny_blip_dir: Path, images: Path) -> None:
    engine = ItmEngine.from_pretrained(tiny_blip_dir, EngineSettings(device="cpu", dtype="fp32"))
    teacher = _adapter(LocalTeacher(engine), images)
    first = _target(images, "img0.png", [CUP])
    teacher.annotate([first])
    (images / "img0.png").unlink()  # digest-first: the engine's LRU holds its vision embedding
    second = dict(first, obj_labels=torch.tensor([HORSE]), verb_labels=torch.zeros(1, len(HICO_VERBS)))
    teacher.annotate([second])
    assert torch.isfinite(second[TEACHER_KEY]).sum() == len(teacher.sentences_of_object(HORSE))
    assert engine.stats.images_encoded == 1


def test_failures_skip_the_batch_or_raise(tiny_blip_dir: Path, images: Path) -> None:
    engine = ItmEngine.from_pretrained(tiny_blip_dir, EngineSettings(device="cpu", dtype="fp32"))
    target = _target(images, "img1.png", [HORSE])
    (images / "img1.png").unlink()  # the teacher needs the bytes and cannot read them
    skipping = _adapter(LocalTeacher(engine), images, on_error="skip")
    assert skipping.annotate([target]) == 0
    assert TEACHER_KEY not in target and skipping.stats.failed_batches == 1
    failing = _adapter(LocalTeacher(engine), images, on_error="fail")
    with pytest.raises(TeacherError, match=r"local engine .*scoring failed \(FileNotFoundError"):
        failing.annotate([target])


def test_triplet_margins_for_the_margin_variant(engine: ItmEngine, images: Path) -> None:
    teacher = _adapter(LocalTeacher(engine), images)
    ride = HICO_VERBS.index("ride")
    triplets = MarginTriplets(
        query=torch.tensor([0, 1, 2]),
        verb=torch.tensor([ride, NO_INTERACTION_INDEX, HICO_VERBS.index("drink_with")]),
        obj=torch.tensor([HORSE, HORSE, CUP]),
        is_positive=torch.tensor([True, False, False]),
    )
    (margins,) = teacher.triplet_margins([_target(images, "img0.png", [HORSE])], [triplets])
    assert margins is not None and margins.shape == (3,)
    sentences = [triplet_sentence("ride", "horse"), triplet_sentence("drink_with", "cup")]
    expected = _direct(engine, images / "img0.png", sentences)
    assert margins[0].item() == pytest.approx(expected[0], abs=1e-5)
    assert math.isnan(margins[1].item())  # no_interaction makes no sentence
    assert margins[2].item() == pytest.approx(expected[1], abs=1e-5)


def test_prompt_variant_changes_the_sentences(images: Path) -> None:
    teacher = _adapter(None, images, prompt_variant="object")
    assert set(teacher.sentences_of_object(HORSE).values()) == {"a person and a horse"}


def test_no_teacher_does_nothing(images: Path) -> None:
    teacher = _adapter(build_backend("none"), images)
    target = _target(images, "img0.png", [HORSE])
    assert not teacher.enabled and teacher.annotate([target]) == 0 and TEACHER_KEY not in target


def test_bad_arguments(images: Path) -> None:
    with pytest.raises(TeacherError, match="expected 'none', 'local', 'grpc://host:port' or 'triton://host:port'"):
        build_backend("http://x")
    with pytest.raises(ValueError, match="on_error"):
        _adapter(None, images, on_error="ignore")
    with pytest.raises(ValueError, match=r"correspondence has shape \(3, 80\)"):
        TeacherScores(None, verbs=HICO_VERBS, correspondence=np.zeros((3, 80), bool), image_root=images)


def test_grpc_teacher_gives_the_same_margins(tiny_blip_dir: Path, engine: ItmEngine, images: Path) -> None:
    from testkit.teacher import running_teacher, teacher_settings

    local_targets = [_target(images, "img0.png", [HORSE, CUP])]
    _adapter(LocalTeacher(engine), images).annotate(local_targets)
    with running_teacher(teacher_settings(tiny_blip_dir)) as server:
        backend = build_backend(f"grpc://{server.target}", timeout_s=30)
        assert isinstance(backend, GrpcTeacher)
        teacher = _adapter(backend, images)
        remote_targets = [_target(images, "img0.png", [HORSE, CUP])]
        try:
            assert teacher.annotate(remote_targets) == 2
        finally:
            teacher.close()
    local, remote = local_targets[0][TEACHER_KEY], remote_targets[0][TEACHER_KEY]
    assert torch.equal(torch.isnan(local), torch.isnan(remote))
    assert torch.allclose(local.nan_to_num(), remote.nan_to_num(), atol=1e-5)
    assert "gRPC teacher at grpc://" in teacher.description


def test_unreachable_grpc_teacher_is_skipped(images: Path) -> None:
    from testkit.servers import free_port

    shutil.copy(images / "img0.png", images / "copy.png")
    backend = build_backend(f"grpc://127.0.0.1:{free_port()}", timeout_s=1.0)
    teacher = _adapter(backend, images, on_error="skip")
    target = _target(images, "copy.png", [HORSE])
    try:
        assert teacher.annotate([target]) == 0
    finally:
        teacher.close()
    assert teacher.stats.failed_batches == 1 and TEACHER_KEY not in target


def test_triton_endpoint_selects_the_triton_client() -> None:
    from student.config import TeacherConfig
    from student.teacher import TritonTeacher, build_backend

    assert TeacherConfig(source="triton://127.0.0.1:8001").source == "triton://127.0.0.1:8001"
    backend = build_backend("triton://127.0.0.1:8001")
    try:
        assert isinstance(backend, TritonTeacher)
        assert "Triton teacher at triton://127.0.0.1:8001" in backend.description
    finally:
        backend.close()


# -- teacher.region=pair ------------------------------------------------------------------------


@pytest.fixture
def noisy(tmp_path: Path) -> Path:
    """A 100x80 (w x h) image of random pixels: every region of it looks different to BLIP."""
    from testkit.teacher import png_bytes

    (tmp_path / "noisy.png").write_bytes(png_bytes(5, (100, 80)))
    return tmp_path


def _direct_region(engine: ItmEngine, path: Path, region: Region, sentences: list[str]) -> list[float]:
    prepared = engine.prepare_image(path.read_bytes(), region=region)
    request = ImageSentences(prepared.digest, prepared, sentences, region)
    return [s.match_logit for s in engine.score([request])[0]]


def _pair_target(root: Path, name: str, obj_labels: list[int], regions: list[list[float]]) -> dict:
    return {
        **_target(root, name, obj_labels),
        "pair_regions_orig": torch.tensor(regions, dtype=torch.float32),
        "orig_size": torch.tensor([80, 100]),
    }


def test_pair_regions_give_two_pairs_of_one_class_their_own_margins(engine: ItmEngine, noisy: Path) -> None:
    regions = [
        [5, 5, 40, 70, 30, 40, 60, 78],  # person 1 and horse 1
        [55, 2, 95, 60, 60, 30, 99, 79],  # person 2 and horse 2
        [5, 5, 40, 70, 0, 0, 0, 0],  # no object box: the whole image
        [55, 2, 95, 60, 60, 30, 99, 79],  # the same boxes as pair 1: the same view
    ]
    teacher = _adapter(LocalTeacher(engine), noisy, region="pair")
    target = _pair_target(noisy, "noisy.png", [HORSE] * 4, regions)
    plan = teacher.plan([target])
    assert [q.region for q in plan.queries] == [
        Region.from_values(regions[0]),
        Region.from_values(regions[1]),
        None,
    ]
    assert teacher.annotate([target]) == 4
    margin = target[TEACHER_KEY]
    candidates = candidate_sentences(HORSE, hico_correspondence(), HICO_VERBS)
    verbs, sentences = [v for v, _ in candidates], [s for _, s in candidates]
    for row in (0, 1):
        expected = _direct_region(engine, noisy / "noisy.png", Region.from_values(regions[row]), sentences)
        assert margin[row, verbs].tolist() == pytest.approx(expected, abs=1e-5)
    # The point of regions: the two horse pairs are told apart (whole-image scores were one row).
    assert (margin[0, verbs] - margin[1, verbs]).abs().max() > 1e-3
    assert margin[2, verbs].tolist() == pytest.approx(_direct(engine, noisy / "noisy.png", sentences), abs=1e-5)
    assert torch.equal(margin[3].nan_to_num(), margin[1].nan_to_num())
    # The memo keeps the views apart: a second epoch asks the teacher nothing.
    scored = teacher.stats.pairs_scored
    assert scored == 3 * len(sentences)
    teacher.annotate([_pair_target(noisy, "noisy.png", [HORSE] * 4, regions)])
    assert teacher.stats.pairs_scored == scored


def test_image_mode_ignores_the_pair_regions(engine: ItmEngine, noisy: Path) -> None:
    regions = [[5, 5, 40, 70, 30, 40, 60, 78], [55, 2, 95, 60, 60, 30, 99, 79]]
    teacher = _adapter(LocalTeacher(engine), noisy)
    target = _pair_target(noisy, "noisy.png", [HORSE, HORSE], regions)
    (query,) = teacher.plan([target]).queries
    assert query is not None and query.region is None
    teacher.annotate([target])
    assert torch.equal(target[TEACHER_KEY][0].nan_to_num(), target[TEACHER_KEY][1].nan_to_num())


def test_pair_region_clips_to_the_image_and_refuses_what_names_no_pair() -> None:
    region = pair_region([-3, 2, 50, 90, 10, 10, 120, 40], (80, 100))
    assert region == Region(human=(0.0, 2.0, 50.0, 80.0), object=(10.0, 10.0, 100.0, 40.0))
    assert pair_region([0, 0, 10, 10, 0, 0, 0, 0], (80, 100)) is None  # no object box
    assert pair_region([0, 0, 10, 10, 5, 5, 5.5, 9], (80, 100)) is None  # under a pixel wide
    assert pair_region([0, 0, 10, 10, 101, 5, 130, 9], (80, 100)) is None  # wholly outside: empty once clipped
    assert pair_region([0, 0, 10, float("nan"), 1, 1, 5, 5]) is None
    with pytest.raises(ValueError, match=r"region must be 'image' or 'pair', got 'box'"):
        _adapter(None, Path("."), region="box")


def test_the_region_sent_is_the_original_boxes_after_flip_and_resize(synthetic_data) -> None:
    from student.data.hoi_dataset import HOIDataset
    from student.data.transforms import BoxesToCxcywh, Compose, Normalize, RandomHorizontalFlip, RandomResize
    from student.data.transforms import ToTensor as ToTensorStep

    root = synthetic_data(6, 2, seed=11)
    augment = Compose([RandomHorizontalFlip(p=1.0), RandomResize([40]), ToTensorStep(), Normalize(), BoxesToCxcywh()])
    dataset = HOIDataset(root / "images" / "train", root / "annotations" / "trainval_hico.json", transforms=augment)
    teacher = _adapter(None, dataset.root_images, region="pair")
    checked = 0
    for index in range(len(dataset)):
        image, target = dataset[index]
        annotation = dataset.annotations[target["image_id"]]
        height, width = annotation.image_size
        assert image.shape[-2] != height or image.shape[-1] != width  # the tensor was resized
        expected = [
            Region.from_values([*annotation.boxes[p.subject], *annotation.boxes[p.object]])
            for p in annotation.pairs()
            if p.object >= 0
        ]
        assert teacher.pair_regions(target) == expected  # in pair order, the flip and resize undone
        regions = {q.region for q in teacher.plan([target]).queries if q is not None}
        assert regions == set(expected)
        checked += len(expected)
    assert checked > 0


def _image_triplets(sub: list[list[float]], obj: list[list[float]], verbs: list[int], objs: list[int]):
    return MarginTriplets(
        query=torch.arange(len(verbs)),
        verb=torch.tensor(verbs),
        obj=torch.tensor(objs),
        is_positive=torch.ones(len(verbs), dtype=torch.bool),
        sub_boxes=torch.tensor(sub),
        obj_boxes=torch.tensor(obj),
    )


def test_margin_scores_predicted_boxes_mapped_back_to_original_pixels(engine: ItmEngine, noisy: Path) -> None:
    ride = HICO_VERBS.index("ride")
    # The 100x80 original was flipped, then resized x2 to 200x160: x = -2 x_orig + 200, y = 2 y_orig.
    target = {
        **_target(noisy, "noisy.png", [HORSE]),
        "size": torch.tensor([160, 200]),
        "orig_size": torch.tensor([80, 100]),
        "frame_affine": torch.tensor([-2.0, 200.0, 2.0, 0.0]),
    }
    # Human [10, 20, 30, 40] -> flip [70, 20, 90, 40] -> x2 [140, 40, 180, 80] -> cxcywh / (200, 160):
    # (0.8, 0.375, 0.2, 0.25). Horse [50, 10, 90, 70] -> [10, 10, 50, 70] -> [20, 20, 100, 140] ->
    # (0.3, 0.5, 0.4, 0.75). A human at (0.05, 0.5, 0.2, 0.25) is [-10, 60, 30, 100] in the frame,
    # [85, 30, 105, 50] in the original, clipped to [85, 30, 100, 50]. A zero-width one is degenerate.
    triplets = _image_triplets(
        [[0.8, 0.375, 0.2, 0.25], [0.05, 0.5, 0.2, 0.25], [0.5, 0.5, 0.0, 0.2]],
        [[0.3, 0.5, 0.4, 0.75]] * 3,
        [ride, ride, ride],
        [HORSE, HORSE, HORSE],
    )
    teacher = _adapter(LocalTeacher(engine), noisy, region="pair")
    regions = teacher.triplet_regions(target, triplets)
    horse = (50.0, 10.0, 90.0, 70.0)
    assert regions[0] is not None and regions[1] is not None and regions[2] is None
    assert regions[0].human == pytest.approx((10.0, 20.0, 30.0, 40.0)) and regions[0].object == pytest.approx(horse)
    assert regions[1].human == pytest.approx((85.0, 30.0, 100.0, 50.0))
    (margins,) = teacher.triplet_margins([target], [triplets])
    assert margins is not None
    sentence = [triplet_sentence("ride", "horse")]
    for t in (0, 1):
        expected = _direct_region(engine, noisy / "noisy.png", regions[t], sentence)[0]
        assert margins[t].item() == pytest.approx(expected, abs=1e-5)
    assert margins[0].item() != pytest.approx(margins[1].item(), abs=1e-4)
    assert math.isnan(margins[2].item())  # degenerate: no score, the loss skips it
    # image mode scores the same triplets on the whole image, boxes or not.
    (whole,) = _adapter(LocalTeacher(engine), noisy).triplet_margins([target], [triplets])
    assert whole is not None
    assert whole.tolist() == pytest.approx(_direct(engine, noisy / "noisy.png", sentence) * 3, abs=1e-5)


def test_select_margin_triplets_carries_the_predicted_boxes() -> None:
    from student.losses.distill import select_margin_triplets

    torch.manual_seed(0)
    outputs = {
        "pred_obj_logits": torch.randn(1, 3, 81),
        "pred_verb_logits": torch.randn(1, 3, len(HICO_VERBS)),
        "pred_sub_boxes": torch.rand(1, 3, 4),
        "pred_obj_boxes": torch.rand(1, 3, 4),
    }
    outputs["pred_obj_logits"][0, :, HORSE] = 10.0
    target = {"obj_labels": torch.tensor([HORSE]), "verb_labels": torch.zeros(1, len(HICO_VERBS))}
    (triplets,) = select_margin_triplets(outputs, [(torch.tensor([0]), torch.tensor([0]))], [target], 4, 0.0)
    assert len(triplets) > 0 and triplets.sub_boxes is not None and triplets.obj_boxes is not None
    assert torch.equal(triplets.sub_boxes, outputs["pred_sub_boxes"][0][triplets.query])
    assert torch.equal(triplets.obj_boxes, outputs["pred_obj_boxes"][0][triplets.query])
