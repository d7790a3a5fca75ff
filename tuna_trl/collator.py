"""Tokenized rows -> a batch of tensors for `TunaRankTrainer`.

Two layouts share one output format, so the log-prob and loss code does not care which one built the batch:

* padded (`padding_free=False`): one row per (prompt, completion) sequence, padded to the longest row.
* prefix-shared (`padding_free=True`): one row per example, `[prompt | completion 0 | completion 1 | ... | ref]`;
  a 4D block mask lets every completion see the prompt and itself only, and position ids restart after the
  prompt for each completion, so the prompt is computed once instead of N times. The mask is built in one vectorised
  expression from per-token segment ids (0 prompt, j > 0 the j-th sequence, -1 padding); see docs/performance.md.

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
        input_ids (R, T), attention_mask (R, T) padded or (R, 1, T, T) packed (`mask_dtype`), position_ids (R, T),
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
                seq_example.append(b), seq_rank.append(k), seq_mle.append(mle), seq_ids.append(list(ids))
            if self.mle_target == "reference" and reference is not None:
                if list(reference) == list(completions[0]):  # already in the batch: score it once
                    seq_mle[len(seq_mle) - len(completions)] = True
                else:
                    seq_example.append(b), seq_rank.append(-1), seq_mle.append(True), seq_ids.append(list(reference))

        prompts = [list(f["prompt_ids"]) for f in features]
        for b, prompt in enumerate(prompts):
            if not prompt:  # nothing would predict the first completion token
                raise ValueError(f"Feature {b} has empty `prompt_ids`; a prompt needs at least one token (e.g. BOS).")
        prompt_len = torch.tensor([len(p) for p in prompts], dtype=torch.long)
        seq_len = torch.tensor([len(ids) for ids in seq_ids], dtype=torch.long)
        seq_example_t = torch.tensor(seq_example, dtype=torch.long)

        # Row contents. `segments` numbers the parts of a row: 0 the prompt, j > 0 the row's j-th sequence; the block
        # mask is built from it. `seq_row` / `seq_start`: where each sequence's tokens start.
        rows, positions, segments = [], [], []
        if self.padding_free:
            seq_row, seq_start = seq_example_t, torch.empty_like(seq_len)
            for b, prompt in enumerate(prompts):
                rows.append(list(prompt)), segments.append([0] * len(prompt))
                positions.append(list(range(len(prompt))))
            for s, (b, ids) in enumerate(zip(seq_example, seq_ids)):
                seq_start[s] = len(rows[b])
                rows[b] += ids
                positions[b] += range(len(prompts[b]), len(prompts[b]) + len(ids))
                segments[b] += [segments[b][-1] + 1] * len(ids)
        else:
            seq_row, seq_start = torch.arange(len(seq_ids)), prompt_len[seq_example_t]
            for b, ids in zip(seq_example, seq_ids):
                rows.append(prompts[b] + ids)
                positions.append(list(range(len(rows[-1]))))

        row_len = torch.tensor([len(r) for r in rows], dtype=torch.long)
        length = int(row_len.max())
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        shift = length - row_len if self.padding_side == "left" else torch.zeros_like(row_len)
        cols = torch.arange(length)[None, :] - shift[:, None]  # column -> index within the row's own tokens
        real = (cols >= 0) & (cols < row_len[:, None])

        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        position_ids = torch.zeros((len(rows), length), dtype=torch.long)
        input_ids[real] = torch.tensor([t for r in rows for t in r], dtype=torch.long)
        position_ids[real] = torch.tensor([p for r in positions for p in r], dtype=torch.long)

        # Targets, flat. Token t of sequence s is predicted by the token before it; for t = 0 that is the prompt's last
        # token (in the packed layout the sequence does not follow the prompt directly).
        target_seq = torch.repeat_interleave(torch.arange(len(seq_ids)), seq_len)
        first = torch.cumsum(seq_len, 0) - seq_len
        t = torch.arange(target_seq.shape[0]) - first[target_seq]
        source = torch.where(t == 0, prompt_len[seq_example_t][target_seq] - 1, seq_start[target_seq] + t - 1)
        row = seq_row[target_seq]
        batch = {
            "input_ids": input_ids,
            "position_ids": position_ids,
            "target_index": row * length + shift[row] + source,
            "target_ids": torch.tensor([tok for ids in seq_ids for tok in ids], dtype=torch.long),
            "target_seq": target_seq,
            "seq_example": seq_example_t,
            "seq_rank": torch.tensor(seq_rank, dtype=torch.long),
            "seq_mle": torch.tensor(seq_mle, dtype=torch.bool),
            "num_completions": torch.tensor(num_completions, dtype=torch.long),
        }
        if self.padding_free:
            segment = torch.full((len(rows), length), -1, dtype=torch.long)
            segment[real] = torch.tensor([j for seg in segments for j in seg], dtype=torch.long)
            batch["attention_mask"] = self._block_mask(segment)
        else:
            batch["attention_mask"] = real.long()
        return batch

    def _block_mask(self, segment: torch.Tensor) -> torch.Tensor:
        """(R, 1, T, T) from the (R, T) segment ids (0 prompt, j > 0 a sequence, -1 padding): causal attention to the
        prompt and within one's own segment. Padding attends to padding only, so no row is fully masked (NaN)."""
        length = segment.shape[1]
        query, key = segment[:, :, None], segment[:, None, :]
        causal = torch.ones(length, length, dtype=torch.bool).tril_()
        mask = ((key == query) | ((key == 0) & (query > 0))) & causal
        mask = mask[:, None]
        if self.mask_dtype == torch.bool:
            return mask
        return torch.zeros(mask.shape, dtype=self.mask_dtype).masked_fill_(~mask, torch.finfo(self.mask_dtype).min)
