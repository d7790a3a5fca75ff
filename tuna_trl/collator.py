"""Tokenized rows -> a batch of tensors for `TunaRankTrainer`.

Two layouts share one output format, so the log-prob and loss code does not care which one built the batch:

* padded (`padding_free=False`): one row per (prompt, completion) sequence, padded to the longest row.
* prefix-shared (`padding_free=True`): one row per example, `[prompt | completion 0 | completion 1 | ... | ref]`;
  a 4D block mask lets every completion see the prompt and itself only, and position ids restart after the
  prompt for each completion, so the prompt is computed once instead of N times.

A *sequence* is one (prompt, completion-or-reference) pair. The targets are listed flat: target m is the token
`target_ids[m]`, predicted by the logits at flat position `target_index[m]` of `input_ids.view(-1)`, and belongs to
sequence `target_seq[m]`. Sequence s is completion `seq_rank[s]` (-1 for a reference that is not a completion) of
example `seq_example[s]`; `seq_mle[s]` says whether its tokens count in the NLL term.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RankedCollator:
    """Collate tokenized ranked rows into model inputs plus the target bookkeeping of the Tuna loss.

    Args:
        pad_token_id: id used for padding.
        mle_target: `"reference"` (the row's `reference_ids`, else its best completion), `"best"` or `"all"`.
        padding_free: prefix-shared packed rows (see module docstring) instead of padded (prompt, completion) rows.
        padding_side: `"right"` or `"left"`, for the padded rows of either layout.
        pad_to_multiple_of: round the padded length up to a multiple of this.
        mask_dtype: dtype of the 4D mask of the packed layout: `torch.bool` for SDPA (True = attend) or a float
            dtype for eager attention (an additive mask of 0 / -inf).

    Input: a list of `{"prompt_ids": list[int], "completion_ids": list[list[int]] (best first),
    "reference_ids": list[int] (optional, [] or None = none)}`. Completion ids already end with EOS.

    Output (R rows of length T, S sequences, M target tokens, B examples):
        input_ids (R, T), attention_mask (R, T) padded or (R, 1, T, T) bool packed, position_ids (R, T),
        target_index / target_ids / target_seq (M,), seq_example / seq_rank / seq_mle (S,), num_completions (B,).

    Example:
    ```python
    >>> collator = RankedCollator(pad_token_id=0)
    >>> batch = collator([{"prompt_ids": [1, 5], "completion_ids": [[7, 2], [8, 9, 2]]}])
    >>> batch["input_ids"]
    tensor([[1, 5, 7, 2, 0],
            [1, 5, 8, 9, 2]])
    >>> batch["target_ids"], batch["target_seq"], batch["seq_rank"]
    (tensor([7, 2, 8, 9, 2]), tensor([0, 0, 1, 1, 1]), tensor([0, 1]))
    >>> RankedCollator(pad_token_id=0, padding_free=True)([{"prompt_ids": [1, 5], "completion_ids": [[7, 2], [8, 9, 2]]}])["position_ids"]
    tensor([[0, 1, 2, 3, 2, 3, 4]])

    ```
    """

    pad_token_id: int
    mle_target: str = "reference"
    padding_free: bool = False
    padding_side: str = "right"
    pad_to_multiple_of: int | None = None
    mask_dtype: torch.dtype = torch.bool

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        seq_example, seq_rank, seq_mle, seq_ids = [], [], [], []  # per sequence: its completion/reference ids
        num_completions = []
        for b, feature in enumerate(features):
            completions = feature["completion_ids"]
            reference = feature.get("reference_ids") or None
            num_completions.append(len(completions))
            for k, ids in enumerate(completions):
                mle = self.mle_target == "all" or (k == 0 and (self.mle_target == "best" or reference is None))
                seq_example.append(b), seq_rank.append(k), seq_mle.append(mle), seq_ids.append(ids)
            if self.mle_target == "reference" and reference is not None:
                if reference == completions[0]:  # already in the batch: score it once
                    seq_mle[len(seq_mle) - len(completions)] = True
                else:
                    seq_example.append(b), seq_rank.append(-1), seq_mle.append(True), seq_ids.append(reference)

        build = self._packed_rows if self.padding_free else self._padded_rows
        rows, positions, targets, blocks = build(features, seq_example, seq_ids)
        length = max(len(r) for r in rows)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of

        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        position_ids = torch.zeros((len(rows), length), dtype=torch.long)
        offsets = []
        for r, (ids, pos) in enumerate(zip(rows, positions)):
            start = length - len(ids) if self.padding_side == "left" else 0
            input_ids[r, start : start + len(ids)] = torch.tensor(ids)
            position_ids[r, start : start + len(ids)] = torch.tensor(pos)
            offsets.append(r * length + start)
        # targets: (row, position within the row, token, sequence)
        target_row, target_pos, target_ids, target_seq = (torch.tensor(x, dtype=torch.long) for x in zip(*targets))
        batch = {
            "input_ids": input_ids,
            "position_ids": position_ids,
            "target_index": torch.tensor(offsets)[target_row] + target_pos,
            "target_ids": target_ids,
            "target_seq": target_seq,
            "seq_example": torch.tensor(seq_example, dtype=torch.long),
            "seq_rank": torch.tensor(seq_rank, dtype=torch.long),
            "seq_mle": torch.tensor(seq_mle, dtype=torch.bool),
            "num_completions": torch.tensor(num_completions, dtype=torch.long),
        }
        if self.padding_free:
            batch["attention_mask"] = self._block_mask(rows, blocks, length)
        else:
            lengths = torch.tensor([len(r) for r in rows])
            cols = torch.arange(length)[None, :]
            if self.padding_side == "left":
                batch["attention_mask"] = (cols >= length - lengths[:, None]).long()
            else:
                batch["attention_mask"] = (cols < lengths[:, None]).long()
        return batch

    @staticmethod
    def _padded_rows(features, seq_example, seq_ids):
        rows, positions, targets = [], [], []
        for s, (b, ids) in enumerate(zip(seq_example, seq_ids)):
            prompt = features[b]["prompt_ids"]
            row = list(prompt) + list(ids)
            rows.append(row)
            positions.append(list(range(len(row))))
            # the logits at position p predict token p + 1
            targets += [(s, len(prompt) - 1 + t, tok, s) for t, tok in enumerate(ids)]
        return rows, positions, targets, None

    @staticmethod
    def _packed_rows(features, seq_example, seq_ids):
        rows, positions, targets, blocks = [], [], [], []
        for b, feature in enumerate(features):
            prompt = list(feature["prompt_ids"])
            row, pos, spans = list(prompt), list(range(len(prompt))), []
            for s in (s for s, e in enumerate(seq_example) if e == b):
                ids = seq_ids[s]
                start = len(row)
                # token t of the completion is predicted by token t-1 of it, the first one by the prompt's last
                sources = [len(prompt) - 1] + list(range(start, start + len(ids) - 1))
                targets += [(b, src, tok, s) for src, tok in zip(sources, ids)]
                row += ids
                pos += range(len(prompt), len(prompt) + len(ids))
                spans.append((start, len(row)))
            rows.append(row), positions.append(pos), blocks.append((len(prompt), spans))
        return rows, positions, targets, blocks

    def _block_mask(self, rows, blocks, length):
        """(R, 1, T, T): causal attention to the prompt, and within one's own completion only."""
        mask = torch.zeros(len(rows), length, length, dtype=torch.bool)
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        for r, (row, (prompt_len, spans)) in enumerate(zip(rows, blocks)):
            shift = length - len(row) if self.padding_side == "left" else 0
            p = slice(shift, shift + prompt_len)
            mask[r, p, p] = causal[:prompt_len, :prompt_len]
            for start, end in spans:
                span = slice(shift + start, shift + end)
                mask[r, span, p] = True
                mask[r, span, span] = causal[: end - start, : end - start]
            pads = torch.ones(length, dtype=torch.bool)
            pads[shift : shift + len(row)] = False
            mask[r, pads, pads] = True  # padding attends to itself only: no fully masked (NaN) rows
        mask = mask[:, None]
        if self.mask_dtype == torch.bool:
            return mask
        return torch.zeros(mask.shape, dtype=self.mask_dtype).masked_fill(~mask, torch.finfo(self.mask_dtype).min)
