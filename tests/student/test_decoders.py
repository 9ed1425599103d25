"""HOI decoders: per-layer output shapes, head routing, cross-branch fusion, shared fusion, width from config."""

from __future__ import annotations

import pytest
import torch

from student.model.config import DecoderConfig, ModelError, StudentModelConfig, TransformerConfig
from student.model.decoders import HOIHeads, SingleDecoder, ThreeBranchDecoder, build_decoder

torch.set_num_threads(1)
B, N, Q, V = 2, 12, 5, 7


def _config(kind: str, d_model: int = 32, nhead: int = 4, layers: int = 3, share_fusion: bool = False):
    return StudentModelConfig(
        transformer=TransformerConfig(
            d_model=d_model,
            nhead=nhead,
            dim_feedforward=48,
            dropout=0.0,
            num_encoder_layers=1,
            num_decoder_layers=layers,
        ),
        decoder=DecoderConfig(kind=kind, num_queries=Q, share_fusion=share_fusion),
        num_verbs=V,
    )


def _memory(d_model: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    memory = torch.randn(B, N, d_model, generator=generator)
    pos = torch.randn(B, N, d_model, generator=generator)
    mask = torch.zeros(B, N, dtype=torch.bool)
    mask[1, 8:] = True
    return memory, mask, pos


@pytest.mark.parametrize("kind", ["single", "three-branch"])
def test_every_layer_predicts_every_head(kind: str) -> None:
    torch.manual_seed(0)
    decoder = build_decoder(_config(kind)).eval()
    assert isinstance(decoder, SingleDecoder if kind == "single" else ThreeBranchDecoder)
    out = decoder(*_memory())
    assert out["pred_obj_logits"].shape == (3, B, Q, 81)
    assert out["pred_verb_logits"].shape == (3, B, Q, V)
    for key in ("pred_sub_boxes", "pred_obj_boxes"):
        assert out[key].shape == (3, B, Q, 4)
        assert (out[key] > 0).all() and (out[key] < 1).all()
    # Each layer gives its own predictions (aux losses need them to differ).
    assert not torch.allclose(out["pred_obj_logits"][0], out["pred_obj_logits"][2])


@pytest.mark.parametrize("kind", ["single", "three-branch"])
def test_decoders_ignore_padded_memory(kind: str) -> None:
    torch.manual_seed(0)
    decoder = build_decoder(_config(kind)).eval()
    memory, mask, pos = _memory()
    changed = memory.clone()
    changed[1, 8:] = 50.0
    first, second = decoder(memory, mask, pos), decoder(changed, mask, pos)
    for key in first:
        torch.testing.assert_close(first[key], second[key], atol=1e-5, rtol=1e-5)


def test_heads_read_their_own_branch() -> None:
    torch.manual_seed(0)
    heads = HOIHeads(16, 80, V)
    human, obj, interaction = torch.randn(3, Q, 16).unbind(0)
    base = heads(human, obj, interaction)
    other = torch.randn(Q, 16)
    assert torch.equal(heads(other, obj, interaction)["pred_obj_logits"], base["pred_obj_logits"])
    assert not torch.equal(heads(other, obj, interaction)["pred_sub_boxes"], base["pred_sub_boxes"])
    changed_object = heads(human, other, interaction)
    assert torch.equal(changed_object["pred_sub_boxes"], base["pred_sub_boxes"])
    assert torch.equal(changed_object["pred_verb_logits"], base["pred_verb_logits"])
    assert not torch.equal(changed_object["pred_obj_boxes"], base["pred_obj_boxes"])
    changed_interaction = heads(human, obj, other)
    assert torch.equal(changed_interaction["pred_obj_logits"], base["pred_obj_logits"])
    assert not torch.equal(changed_interaction["pred_verb_logits"], base["pred_verb_logits"])


def test_three_branch_fusion_lets_branches_see_each_other() -> None:
    torch.manual_seed(0)
    decoder = ThreeBranchDecoder(_config("three-branch")).eval()
    memory, mask, pos = _memory()
    before = decoder(memory, mask, pos)
    with torch.no_grad():
        decoder.object_query_embed.weight.add_(torch.randn_like(decoder.object_query_embed.weight))
    after = decoder(memory, mask, pos)
    # Human boxes come from the human branch only, yet the object queries changed them: the
    # relational context carried object information into the human stream.
    assert not torch.allclose(before["pred_sub_boxes"], after["pred_sub_boxes"], atol=1e-4)
    assert not torch.allclose(before["pred_verb_logits"], after["pred_verb_logits"], atol=1e-4)


def test_three_branch_relational_and_fusion_modules_get_gradients() -> None:
    torch.manual_seed(0)
    decoder = ThreeBranchDecoder(_config("three-branch")).train()
    out = decoder(*_memory())
    out["pred_verb_logits"].sum().backward()
    for name, parameter in decoder.named_parameters():
        if name.startswith(
            ("relation.ternary.", "relation.relation_to_memory.", "fusion.0.human.", "fusion.2.interaction.")
        ):
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_fusion_per_layer_or_shared() -> None:
    per_layer = ThreeBranchDecoder(_config("three-branch", share_fusion=False))
    shared = ThreeBranchDecoder(_config("three-branch", share_fusion=True))
    assert len(per_layer.fusion) == 3 and len(shared.fusion) == 1
    fusion_params = sum(p.numel() for p in shared.fusion.parameters())
    total = sum(p.numel() for p in per_layer.parameters())
    assert total - sum(p.numel() for p in shared.parameters()) == 2 * fusion_params
    out = shared.eval()(*_memory())
    assert out["pred_verb_logits"].shape == (3, B, Q, V)
    # One relational module serves all layers in both settings.
    assert sum(1 for name, _ in per_layer.named_children() if name == "relation") == 1


def test_three_branch_width_comes_from_the_config() -> None:
    decoder = ThreeBranchDecoder(_config("three-branch", d_model=48, nhead=6)).eval()
    params = dict(decoder.named_parameters())
    assert params["relation.ternary.layers.0.weight"].shape == (48, 3 * 48)
    assert params["fusion.1.object.gate.layers.0.weight"].shape == (48, 2 * 48)
    assert params["relation.relation_to_memory.attn.in_proj_weight"].shape == (3 * 48, 48)
    out = decoder(*_memory(d_model=48))
    assert out["pred_obj_logits"].shape == (3, B, Q, 81)


def test_unknown_decoder_kind_is_rejected() -> None:
    config = _config("single")
    config.decoder.kind = "four-branch"  # type: ignore[assignment]  # bypasses validation on purpose
    with pytest.raises(ModelError, match="four-branch"):
        build_decoder(config)
    with pytest.raises(ModelError, match=r"decoder\.kind"):
        DecoderConfig(kind="four-branch")  # type: ignore[arg-type]


def test_heads_compute_in_fp32_under_autocast() -> None:
    # Box regression and the verb logits the distillation reads keep full precision: the heads
    # take bf16 decoder features and compute in fp32, as if there were no autocast.
    heads = HOIHeads(32, 80, V)
    generator = torch.Generator().manual_seed(0)
    features = [torch.randn(B, Q, 32, generator=generator).to(torch.bfloat16) for _ in range(3)]
    expected = heads(*[f.float() for f in features])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = heads(*features)
    for key, value in outputs.items():
        assert value.dtype == torch.float32, key
        assert torch.equal(value, expected[key]), key
