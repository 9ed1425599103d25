"""DETR's post-norm transformer encoder and decoder layers, batch-first, plus DETR's small MLP.

Module names follow DETR (``self_attn``, ``multihead_attn``, ``linear1``, ``linear2``, ``norm1``..
``norm3``, decoder ``norm``; MLP ``layers.{0,1,2}``) and attention is ``nn.MultiheadAttention``,
so a DETR checkpoint's ``in_proj_weight`` / ``out_proj`` tensors load without reshaping. All
sequences here are batch-first: (B, N, d). Positional embeddings are added to queries and keys
(never to values) at every layer, as DETR.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def with_pos(x: Tensor, pos: Tensor | None) -> Tensor:
    """x + pos, or x when there is no positional embedding."""
    return x if pos is None else x + pos


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU between them (DETR's box head: d -> d -> d -> 4)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip(dims_in, dims_out, strict=True))

    def forward(self, x: Tensor) -> Tensor:  # (..., input_dim) -> (..., output_dim)
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index < len(self.layers) - 1:
                x = F.relu(x)
        return x


class TransformerEncoderLayer(nn.Module):
    """Self-attention over the image tokens, then FFN; residual + LayerNorm after each (post-norm)."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, src: Tensor, pos: Tensor | None = None, key_padding_mask: Tensor | None = None) -> Tensor:
        """src, pos: (B, N, d); key_padding_mask: (B, N) bool, True = padding -> (B, N, d)."""
        q = k = with_pos(src, pos)
        attended = self.self_attn(q, k, value=src, key_padding_mask=key_padding_mask, need_weights=False)[0]
        src = self.norm1(src + self.dropout1(attended))
        hidden = self.linear2(self.dropout(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout2(hidden))


class TransformerEncoder(nn.Module):
    """A stack of encoder layers (no final norm: DETR's post-norm encoder has none)."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout) for _ in range(num_layers)
        )
        reset_parameters(self)

    def forward(self, src: Tensor, pos: Tensor | None = None, key_padding_mask: Tensor | None = None) -> Tensor:
        """src, pos: (B, N, d) image tokens; key_padding_mask: (B, N) True = padding -> memory (B, N, d)."""
        for layer in self.layers:
            src = layer(src, pos, key_padding_mask)
        return src


class TransformerDecoderLayer(nn.Module):
    """Query self-attention, cross-attention to the memory, FFN; residual + LayerNorm after each."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        *,
        query_pos: Tensor | None = None,
        pos: Tensor | None = None,
        memory_key_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """tgt, query_pos: (B, Q, d); memory, pos: (B, N, d); memory_key_padding_mask: (B, N) -> (B, Q, d)."""
        q = k = with_pos(tgt, query_pos)
        attended = self.self_attn(q, k, value=tgt, need_weights=False)[0]
        tgt = self.norm1(tgt + self.dropout1(attended))
        attended = self.multihead_attn(
            with_pos(tgt, query_pos),
            with_pos(memory, pos),
            value=memory,
            key_padding_mask=memory_key_padding_mask,
            need_weights=False,
        )[0]
        tgt = self.norm2(tgt + self.dropout2(attended))
        hidden = self.linear2(self.dropout(F.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout3(hidden))


class TransformerDecoder(nn.Module):
    """A stack of decoder layers and the final LayerNorm applied to every layer's output, as DETR.

    ``forward`` returns all intermediate outputs, (L, B, Q, d), each passed through ``norm``;
    the heads read every one of them (the last for the prediction, the others for auxiliary losses).
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TransformerDecoderLayer(d_model, nhead, dim_feedforward, dropout) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        reset_parameters(self)

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        *,
        query_pos: Tensor | None = None,
        pos: Tensor | None = None,
        memory_key_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """tgt, query_pos: (B, Q, d); memory, pos: (B, N, d) -> (L, B, Q, d), one normed output per layer."""
        intermediate = []
        for layer in self.layers:
            tgt = layer(tgt, memory, query_pos=query_pos, pos=pos, memory_key_padding_mask=memory_key_padding_mask)
            intermediate.append(self.norm(tgt))
        return torch.stack(intermediate)


def reset_parameters(module: nn.Module) -> None:
    """DETR's initialisation of transformer weights: Xavier-uniform for every matrix, biases kept."""
    for parameter in module.parameters():
        if parameter.dim() > 1:
            nn.init.xavier_uniform_(parameter)
