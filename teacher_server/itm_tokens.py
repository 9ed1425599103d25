"""Token ids of ITM text as the scoring engine builds them, for code that runs BLIP's text tower
outside the engine (teacher fine-tuning, evidence maps): the same start-token policy, right-padded."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from teacher_server.engine import itm_start_token_id

__all__ = ["ItmTextTokens"]


class ItmTextTokens:
    """``[CLS] ... [SEP]`` ids with the first id replaced by the ITM start token of ``policy``
    (``"cls"`` keeps it, ``"enc"`` puts ``[ENC]`` there), and padded batches of them."""

    def __init__(self, tokenizer: Any, policy: str) -> None:
        self.tokenizer = tokenizer
        self.start_id = itm_start_token_id(tokenizer, policy)
        self.pad_id = tokenizer.pad_token_id or 0

    def ids(self, sentence: str) -> tuple[int, ...]:
        """The ids of one sentence, start token in place."""
        ids = tuple(self.tokenizer(sentence, add_special_tokens=True)["input_ids"])
        return ids if self.start_id is None else (self.start_id, *ids[1:])

    def batch(self, sentences: Sequence[str]) -> tuple[Tensor, Tensor]:
        """(input_ids, attention_mask), each (B, L) long, right-padded to the longest sentence."""
        rows = [self.ids(sentence) for sentence in sentences]
        length = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for index, row in enumerate(rows):
            input_ids[index, : len(row)] = torch.tensor(row)
            mask[index, : len(row)] = 1
        return input_ids, mask
