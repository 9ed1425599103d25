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
from teacher_server.engine import EngineSettings, ImageSentences, ItmEngine
from teacher_server.errors import TeacherError
from teacher_server.hoi.classes import HICO_VERBS, NO_INTERACTION_INDEX, OBJECT_NAMES, hico_correspondence
from teacher_server.hoi.digest import image_digest
from teacher_server.hoi.prompts import candidate_sentences, triplet_sentence

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
