"""DETR transformer layers and the sine position encoding: names, post-norm, masks, positions on q/k only."""

from __future__ import annotations

import math

import torch

from student.model.position_encoding import PositionEmbeddingSine
from student.model.transformer import (
    MLP,
    TransformerDecoder,
    TransformerDecoderLayer,
    TransformerEncoder,
    TransformerEncoderLayer,
)

torch.set_num_threads(1)
D, HEADS, FFN = 16, 4, 32


def _sine_by_hand(height: int, width: int, num_pos_feats: int, temperature: float = 10000.0) -> torch.Tensor:
    """DETR's formula written out cell by cell, for an unpadded (height, width) map -> (2F, H, W)."""
    out = torch.zeros(2 * num_pos_feats, height, width)
    for i in range(height):
        for j in range(width):
            y = (i + 1) / height * 2 * math.pi
            x = (j + 1) / width * 2 * math.pi
            for k in range(num_pos_feats):
                frequency = temperature ** (2 * (k // 2) / num_pos_feats)
                trig = math.sin if k % 2 == 0 else math.cos
                out[k, i, j] = trig(y / frequency)
                out[num_pos_feats + k, i, j] = trig(x / frequency)
    return out


def test_sine_encoding_follows_detr_formula() -> None:
    encoding = PositionEmbeddingSine(num_pos_feats=4)(torch.zeros(1, 3, 5, dtype=torch.bool))
    assert encoding.shape == (1, 8, 3, 5)
    torch.testing.assert_close(encoding[0], _sine_by_hand(3, 5, 4), atol=1e-5, rtol=1e-5)


def test_sine_encoding_of_valid_cells_ignores_padding() -> None:
    mask = torch.zeros(1, 6, 7, dtype=torch.bool)
    mask[:, 4:, :] = True
    mask[:, :, 5:] = True
    padded = PositionEmbeddingSine(num_pos_feats=8)(mask)
    alone = PositionEmbeddingSine(num_pos_feats=8)(torch.zeros(1, 4, 5, dtype=torch.bool))
    torch.testing.assert_close(padded[:, :, :4, :5], alone, atol=1e-5, rtol=1e-5)


def test_mlp_has_detr_layer_names_and_relu_between_layers() -> None:
    mlp = MLP(D, 8, 4, 3)
    assert [name for name, _ in mlp.named_parameters()] == [
        "layers.0.weight",
        "layers.0.bias",
        "layers.1.weight",
        "layers.1.bias",
        "layers.2.weight",
        "layers.2.bias",
    ]
    x = torch.randn(5, D)
    by_hand = mlp.layers[2](torch.relu(mlp.layers[1](torch.relu(mlp.layers[0](x)))))
    torch.testing.assert_close(mlp(x), by_hand)


def test_layers_use_detr_parameter_names() -> None:
    encoder = dict(TransformerEncoder(D, HEADS, FFN, 0.0, 2).named_parameters())
    assert encoder["layers.1.self_attn.in_proj_weight"].shape == (3 * D, D)
    for name in ("self_attn.out_proj.weight", "linear1.weight", "linear2.bias", "norm1.weight", "norm2.bias"):
        assert f"layers.0.{name}" in encoder
    assert not any(name.startswith("norm.") for name in encoder)  # post-norm encoder: no final norm
    decoder = dict(TransformerDecoder(D, HEADS, FFN, 0.0, 2).named_parameters())
    for name in (
        "self_attn.in_proj_bias",
        "multihead_attn.in_proj_weight",
        "multihead_attn.out_proj.bias",
        "linear1.bias",
        "norm3.weight",
    ):
        assert f"layers.1.{name}" in decoder
    assert "norm.weight" in decoder and "norm.bias" in decoder


def test_encoder_layer_is_post_norm() -> None:
    layer = TransformerEncoderLayer(D, HEADS, FFN, 0.0)
    out = layer(torch.randn(2, 7, D) * 5 + 3)
    # The last operation is LayerNorm (with its initial affine terms 1, 0).
    torch.testing.assert_close(out.mean(-1), torch.zeros(2, 7), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.var(-1, unbiased=False), torch.ones(2, 7), atol=1e-3, rtol=0)


def test_positions_go_to_queries_and_keys_not_values() -> None:
    torch.manual_seed(0)
    # With a single key, attention weights are all 1: only the value path is left, so if the
    # position were added to values the output would change with it.
    memory = torch.randn(2, 1, D)
    decoder_layer = TransformerDecoderLayer(D, HEADS, FFN, 0.0).eval()
    tgt = torch.randn(2, 3, D)
    first = decoder_layer(tgt, memory, pos=torch.randn(2, 1, D))
    second = decoder_layer(tgt, memory, pos=torch.randn(2, 1, D))
    torch.testing.assert_close(first, second)
    encoder_layer = TransformerEncoderLayer(D, HEADS, FFN, 0.0).eval()
    src = torch.randn(2, 1, D)
    torch.testing.assert_close(encoder_layer(src, torch.randn(2, 1, D)), encoder_layer(src, torch.randn(2, 1, D)))
    # ... and with several keys the positions do matter.
    memory = torch.randn(2, 5, D)
    assert not torch.allclose(decoder_layer(tgt, memory, pos=torch.randn(2, 5, D)), decoder_layer(tgt, memory))


def test_encoder_ignores_padded_tokens() -> None:
    torch.manual_seed(0)
    encoder = TransformerEncoder(D, HEADS, FFN, 0.0, 2).eval()
    src, pos = torch.randn(2, 9, D), torch.randn(2, 9, D)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, 6:] = True
    changed_src, changed_pos = src.clone(), pos.clone()
    changed_src[0, 6:] = torch.randn(3, D) * 10
    changed_pos[0, 6:] = torch.randn(3, D)
    first = encoder(src, pos, mask)
    second = encoder(changed_src, changed_pos, mask)
    torch.testing.assert_close(first[0, :6], second[0, :6], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(first[1], second[1])
    unmasked = encoder(changed_src, changed_pos, torch.zeros_like(mask))
    assert not torch.allclose(unmasked[0, :6], first[0, :6], atol=1e-3)


def test_decoder_returns_every_layer_through_the_final_norm() -> None:
    torch.manual_seed(0)
    decoder = TransformerDecoder(D, HEADS, FFN, 0.0, 3).eval()
    with torch.no_grad():  # a non-trivial final norm, so "normed" is distinguishable from the layer's own norm3
        decoder.norm.weight.uniform_(0.5, 2.0)
        decoder.norm.bias.normal_()
    tgt, query_pos = torch.zeros(2, 4, D), torch.randn(2, 4, D)
    memory, pos = torch.randn(2, 6, D), torch.randn(2, 6, D)
    out = decoder(tgt, memory, query_pos=query_pos, pos=pos)
    assert out.shape == (3, 2, 4, D)
    state = tgt
    for index, layer in enumerate(decoder.layers):
        state = layer(state, memory, query_pos=query_pos, pos=pos)
        torch.testing.assert_close(out[index], decoder.norm(state))


def test_decoder_ignores_padded_memory() -> None:
    torch.manual_seed(0)
    decoder = TransformerDecoder(D, HEADS, FFN, 0.0, 2).eval()
    tgt, query_pos = torch.zeros(1, 4, D), torch.randn(1, 4, D)
    memory, pos = torch.randn(1, 6, D), torch.randn(1, 6, D)
    mask = torch.tensor([[False, False, False, False, True, True]])
    changed = memory.clone()
    changed[0, 4:] = 100.0
    first = decoder(tgt, memory, query_pos=query_pos, pos=pos, memory_key_padding_mask=mask)
    second = decoder(tgt, changed, query_pos=query_pos, pos=pos, memory_key_padding_mask=mask)
    torch.testing.assert_close(first, second, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(first, decoder(tgt, changed, query_pos=query_pos, pos=pos), atol=1e-3)
