"""HOI decoders: query sets over the encoder memory, and the prediction heads.

Two kinds, chosen by ``DecoderConfig.kind``:
- ``single`` (QPIC): one query set; each query predicts a whole triplet (human box, object box,
  object class, verbs) from one decoder stream.
- ``three-branch`` (MUREN): human, object and interaction query sets, each with its own decoder
  stack; after every layer a relational module mixes the three streams into a context that each
  branch takes in through a gated residual. Query ``q`` of the three branches is one triplet.

Every decoder returns per-layer predictions stacked on a leading layer axis (L, B, Q, ...);
``HOIDetector`` splits the last layer from the auxiliary ones.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from student.model.config import ModelError, StudentModelConfig
from student.model.transformer import MLP, TransformerDecoder, reset_parameters, with_pos
from teacher_server.precision import fp32_autocast_off

PREDICTION_KEYS: tuple[str, ...] = ("pred_obj_logits", "pred_verb_logits", "pred_sub_boxes", "pred_obj_boxes")


class HOIHeads(nn.Module):
    """Human box, object box (3-layer MLPs, sigmoid cxcywh), object class (C + 1, last = no-object), verbs.

    Verb logits are raw; the verb loss and inference apply the sigmoid (verbs are multi-label).
    The heads compute in fp32 (fp32 inputs, autocast off) whatever precision the decoder ran
    in: box coordinates near 0 or 1 and the verb logits the distillation compares keep full
    precision, and the heads are a tiny part of the compute.
    """

    def __init__(self, d_model: int, num_obj_classes: int, num_verbs: int) -> None:
        super().__init__()
        self.sub_bbox_embed = MLP(d_model, d_model, 4, 3)
        self.obj_bbox_embed = MLP(d_model, d_model, 4, 3)
        self.obj_class_embed = nn.Linear(d_model, num_obj_classes + 1)
        self.verb_class_embed = nn.Linear(d_model, num_verbs)

    def forward(self, human: Tensor, obj: Tensor, interaction: Tensor) -> dict[str, Tensor]:
        """human, obj, interaction: (..., d) features of the same queries -> dict of (..., k) float32 predictions."""
        with fp32_autocast_off(human):
            return self._predict(human.float(), obj.float(), interaction.float())

    def _predict(self, human: Tensor, obj: Tensor, interaction: Tensor) -> dict[str, Tensor]:
        return {
            "pred_obj_logits": self.obj_class_embed(obj),
            "pred_verb_logits": self.verb_class_embed(interaction),
            "pred_sub_boxes": self.sub_bbox_embed(human).sigmoid(),
            "pred_obj_boxes": self.obj_bbox_embed(obj).sigmoid(),
        }


def _query_pos(embedding: nn.Embedding, batch_size: int) -> Tensor:
    """A learned query table (Q, d) as the per-image query positional embedding (B, Q, d)."""
    return embedding.weight.unsqueeze(0).expand(batch_size, -1, -1)


class SingleDecoder(nn.Module):
    """QPIC-style: one DETR decoder over ``num_queries`` queries; all heads read the same stream."""

    def __init__(self, config: StudentModelConfig) -> None:
        super().__init__()
        t = config.transformer
        self.query_embed = nn.Embedding(config.decoder.num_queries, t.d_model)
        self.transformer = TransformerDecoder(t.d_model, t.nhead, t.dim_feedforward, t.dropout, t.num_decoder_layers)
        self.heads = HOIHeads(t.d_model, config.num_obj_classes, config.num_verbs)

    def forward(self, memory: Tensor, memory_mask: Tensor, memory_pos: Tensor) -> dict[str, Tensor]:
        """memory, memory_pos: (B, N, d); memory_mask: (B, N) True = padding -> dict of (L, B, Q, k)."""
        query_pos = _query_pos(self.query_embed, memory.shape[0])
        # As DETR: the content stream starts at zero and the learned queries act as positions.
        hidden = self.transformer(
            torch.zeros_like(query_pos),
            memory,
            query_pos=query_pos,
            pos=memory_pos,
            memory_key_padding_mask=memory_mask,
        )
        return self.heads(hidden, hidden, hidden)


class AttentionBlock(nn.Module):
    """Post-norm residual attention: ``norm(x + dropout(attn(x + x_pos, y + y_pos, y)))``."""

    def __init__(self, d_model: int, nhead: int, dropout: float) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model)

    def forward(
        self,
        x: Tensor,
        y: Tensor,
        *,
        x_pos: Tensor | None = None,
        y_pos: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """x: (B, N, d) queries; y: (B, M, d) keys / values; key_padding_mask: (B, M) -> (B, N, d)."""
        attended = self.attn(
            with_pos(x, x_pos),
            with_pos(y, y_pos),
            value=y,
            key_padding_mask=key_padding_mask,
            need_weights=False,
        )[0]
        return self.norm(x + self.dropout(attended))


class FeedForwardBlock(nn.Module):
    """Post-norm residual FFN: ``norm(x + dropout(W2 relu(W1 x)))``."""

    def __init__(self, d_model: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x + self.dropout(self.linear2(self.dropout(torch.relu(self.linear1(x))))))


class RelationalModule(nn.Module):
    """MUREN's multiplex relation context of the three branches at one decoder layer.

    Per query index q (one triplet), from its human, object and interaction features:
    - ternary feature: MLP over the concatenation of the three;
    - unary features: self-attention across the three branch tokens;
    - pairwise features: MLPs over (human, object), (human, interaction), (object, interaction),
      then self-attention across those three;
    - the ternary feature attends to the unary features, then to the pairwise ones;
    - that relation feature attends to the encoder memory (+ FFN): the multiplex context.
    Learned role embeddings tell the three tokens apart inside the small attentions (the
    attentions are otherwise blind to which token is the human, object or interaction one).
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        self.ternary = MLP(3 * d_model, d_model, d_model, 2)
        self.pair_human_object = MLP(2 * d_model, d_model, d_model, 2)
        self.pair_human_interaction = MLP(2 * d_model, d_model, d_model, 2)
        self.pair_object_interaction = MLP(2 * d_model, d_model, d_model, 2)
        self.unary_role_embed = nn.Embedding(3, d_model)
        self.pair_role_embed = nn.Embedding(3, d_model)
        self.unary_attn = AttentionBlock(d_model, nhead, dropout)
        self.pairwise_attn = AttentionBlock(d_model, nhead, dropout)
        self.ternary_to_unary = AttentionBlock(d_model, nhead, dropout)
        self.relation_to_pairwise = AttentionBlock(d_model, nhead, dropout)
        self.relation_to_memory = AttentionBlock(d_model, nhead, dropout)
        self.ffn = FeedForwardBlock(d_model, dim_feedforward, dropout)

    def forward(
        self,
        human: Tensor,
        obj: Tensor,
        interaction: Tensor,
        memory: Tensor,
        memory_mask: Tensor,
        memory_pos: Tensor,
    ) -> Tensor:
        """human, obj, interaction: (B, Q, d); memory, memory_pos: (B, N, d); memory_mask: (B, N).

        Returns the multiplex context (B, Q, d).
        """
        batch, queries, d_model = human.shape
        # Fold queries into the batch: the small attentions run over the 3 tokens of one triplet.
        ternary = self.ternary(torch.cat((human, obj, interaction), dim=-1)).reshape(batch * queries, 1, d_model)
        unary = torch.stack((human, obj, interaction), dim=2).reshape(batch * queries, 3, d_model)
        unary_pos = self.unary_role_embed.weight.unsqueeze(0)
        unary = self.unary_attn(unary, unary, x_pos=unary_pos, y_pos=unary_pos)
        pairwise = torch.stack(
            (
                self.pair_human_object(torch.cat((human, obj), dim=-1)),
                self.pair_human_interaction(torch.cat((human, interaction), dim=-1)),
                self.pair_object_interaction(torch.cat((obj, interaction), dim=-1)),
            ),
            dim=2,
        ).reshape(batch * queries, 3, d_model)
        pair_pos = self.pair_role_embed.weight.unsqueeze(0)
        pairwise = self.pairwise_attn(pairwise, pairwise, x_pos=pair_pos, y_pos=pair_pos)
        relation = self.ternary_to_unary(ternary, unary, y_pos=unary_pos)
        relation = self.relation_to_pairwise(relation, pairwise, y_pos=pair_pos)
        relation = relation.reshape(batch, queries, d_model)
        context = self.relation_to_memory(relation, memory, y_pos=memory_pos, key_padding_mask=memory_mask)
        return self.ffn(context)


class GatedFusion(nn.Module):
    """Gated residual fusion of a context into a branch: ``x + sigmoid(G([x, c])) * V([x, c])``."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.gate = MLP(2 * d_model, d_model, d_model, 2)
        self.value = MLP(2 * d_model, d_model, d_model, 2)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:  # (B, Q, d), (B, Q, d) -> (B, Q, d)
        joint = torch.cat((x, context), dim=-1)
        return x + self.gate(joint).sigmoid() * self.value(joint)


class BranchFusion(nn.Module):
    """One ``GatedFusion`` per branch (human, object, interaction)."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.human = GatedFusion(d_model)
        self.object = GatedFusion(d_model)
        self.interaction = GatedFusion(d_model)

    def forward(
        self, human: Tensor, obj: Tensor, interaction: Tensor, context: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        return self.human(human, context), self.object(obj, context), self.interaction(interaction, context)


class ThreeBranchDecoder(nn.Module):
    """MUREN-style decoder: three query sets and decoder stacks, relational fusion after every layer.

    Layer l: each branch runs its own DETR decoder layer (self-attention, cross-attention to the
    shared memory, FFN); the shared ``relation`` module builds the multiplex context from the
    three outputs; each branch adds it through its gated fusion (``fusion[l]``, or ``fusion[0]``
    for every layer when ``share_fusion``). The fused streams feed layer l + 1, and their
    branch-normed versions feed the heads: human box <- human branch, object class and box <-
    object branch, verbs <- interaction branch.
    """

    def __init__(self, config: StudentModelConfig) -> None:
        super().__init__()
        t, num_queries = config.transformer, config.decoder.num_queries
        self.num_layers = t.num_decoder_layers
        self.share_fusion = config.decoder.share_fusion
        self.human_query_embed = nn.Embedding(num_queries, t.d_model)
        self.object_query_embed = nn.Embedding(num_queries, t.d_model)
        self.interaction_query_embed = nn.Embedding(num_queries, t.d_model)
        self.human_branch = TransformerDecoder(t.d_model, t.nhead, t.dim_feedforward, t.dropout, self.num_layers)
        self.object_branch = TransformerDecoder(t.d_model, t.nhead, t.dim_feedforward, t.dropout, self.num_layers)
        self.interaction_branch = TransformerDecoder(t.d_model, t.nhead, t.dim_feedforward, t.dropout, self.num_layers)
        self.relation = RelationalModule(t.d_model, t.nhead, t.dim_feedforward, t.dropout)
        self.fusion = nn.ModuleList(BranchFusion(t.d_model) for _ in range(1 if self.share_fusion else self.num_layers))
        reset_parameters(self.relation)
        reset_parameters(self.fusion)
        self.heads = HOIHeads(t.d_model, config.num_obj_classes, config.num_verbs)

    def forward(self, memory: Tensor, memory_mask: Tensor, memory_pos: Tensor) -> dict[str, Tensor]:
        """memory, memory_pos: (B, N, d); memory_mask: (B, N) True = padding -> dict of (L, B, Q, k)."""
        batch = memory.shape[0]
        branches = (self.human_branch, self.object_branch, self.interaction_branch)
        query_pos = [
            _query_pos(e, batch)
            for e in (self.human_query_embed, self.object_query_embed, self.interaction_query_embed)
        ]
        states = [torch.zeros_like(pos) for pos in query_pos]
        normed: list[list[Tensor]] = [[], [], []]
        for index in range(self.num_layers):
            states = [
                branch.layers[index](state, memory, query_pos=pos, pos=memory_pos, memory_key_padding_mask=memory_mask)
                for branch, state, pos in zip(branches, states, query_pos, strict=True)
            ]
            context = self.relation(*states, memory, memory_mask, memory_pos)
            states = list(self.fusion[0 if self.share_fusion else index](*states, context))
            for outputs, branch, state in zip(normed, branches, states, strict=True):
                outputs.append(branch.norm(state))
        human, obj, interaction = (torch.stack(outputs) for outputs in normed)
        return self.heads(human, obj, interaction)


def build_decoder(config: StudentModelConfig) -> SingleDecoder | ThreeBranchDecoder:
    """The decoder named by ``config.decoder.kind``."""
    if config.decoder.kind == "single":
        return SingleDecoder(config)
    if config.decoder.kind == "three-branch":
        return ThreeBranchDecoder(config)
    raise ModelError(f"decoder.kind: got {config.decoder.kind!r}, expected 'single' or 'three-branch'")
