"""`TransformersBackend`: batched sampling from a local `transformers` causal LM, with each sampled token's log-prob
under the model's own distribution."""

from __future__ import annotations

import threading

from .sample import Sample, Usage, current_usage_scopes, record_usage


class TransformersBackend:
    """Sample from a local causal LM, many prompts x n samples per `model.generate` call.

    Args:
        model_or_path: a `PreTrainedModel` or a path/id for `AutoModelForCausalLM.from_pretrained`.
        batch_size: sequences (prompt copies x samples) per `generate` call.
        device: where to run; default: the model's device for a model object, else CUDA when available.
        tokenizer: default: `AutoTokenizer.from_pretrained(model_or_path)` (or the model's `name_or_path`).
        generation_kwargs: extra `generate` arguments. By default sampling is plain temperature sampling from the
            whole distribution (`top_k=0, top_p=1.0`), whatever the model's generation config says.

    Log-probs: `token_logprobs[t]` is log p(token_t | prompt, tokens_<t) under the model's unmodified distribution
    (temperature 1, no top-k/top-p), computed by one forward pass over prompt + sampled tokens after sampling, so
    it is exactly what a fresh forward pass gives. A sample that ended with EOS has EOS's log-prob as its last entry
    (the trainer's v also counts EOS) while `text` leaves EOS out; `finish_reason` is "stop" then, else "length".
    """

    def __init__(
        self,
        model_or_path,
        batch_size: int = 32,
        device=None,
        tokenizer=None,
        generation_kwargs: dict | None = None,
    ):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if isinstance(model_or_path, str):
            model = AutoModelForCausalLM.from_pretrained(model_or_path)
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            model.to(device)
        else:
            model = model_or_path
            device = device or model.device
            model.to(device)
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(
                model_or_path if isinstance(model_or_path, str) else model.config.name_or_path
            )
        if tokenizer.pad_token is None:  # batching needs one; masked out, so any token will do
            tokenizer.pad_token = tokenizer.eos_token
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.generation_kwargs = {"top_k": 0, "top_p": 1.0, **(generation_kwargs or {})}
        self.name = model.config.name_or_path or type(model).__name__
        self.usage = Usage()
        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = tokenizer.eos_token_id
        self.eos_token_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_token_ids)
        # one generate at a time: concurrent calls on one model only fight over the same cores
        self._lock = threading.Lock()

    def generate(
        self,
        prompts: list[str],
        n: int = 1,
        temperature: float = 1.0,
        max_new_tokens: int = 256,
        logprobs: bool = False,
    ) -> list[list[Sample]]:
        """`n` samples for each prompt (temperature 0 = greedy), in chunks of `batch_size` sequences."""
        rows = [prompt for prompt in prompts for _ in range(n)]
        # chunks of similar prompt lengths waste less compute on left padding
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        samples: list[Sample | None] = [None] * len(rows)
        with self._lock:
            for start in range(0, len(rows), self.batch_size):
                chunk = order[start : start + self.batch_size]
                batch = self._generate_batch([rows[i] for i in chunk], temperature, max_new_tokens, logprobs)
                for i, sample in zip(chunk, batch):
                    samples[i] = sample
        return [samples[i * n : (i + 1) * n] for i in range(len(prompts))]

    def _generate_batch(self, texts, temperature, max_new_tokens, logprobs) -> list[Sample]:
        import torch

        enc = self.tokenizer(texts, return_tensors="pt", padding=True, padding_side="left").to(self.device)
        enc.pop("token_type_ids", None)
        sampling = (
            {"do_sample": True, "temperature": temperature, **self.generation_kwargs}
            if temperature > 0
            else {"do_sample": False}
        )
        with torch.no_grad():
            sequences = self.model.generate(
                **enc, max_new_tokens=max_new_tokens, pad_token_id=self.pad_token_id, **sampling
            )
        prompt_len = enc["input_ids"].shape[1]
        completion_ids = sequences[:, prompt_len:]
        # a sequence's completion ends at its first EOS (kept, for its log-prob); what follows is padding
        is_eos = torch.zeros_like(completion_ids, dtype=torch.bool)
        for eos in self.eos_token_ids:
            is_eos |= completion_ids == eos
        ended = is_eos.any(dim=1)
        first_eos = torch.where(ended, is_eos.int().argmax(dim=1), completion_ids.shape[1])
        lengths = torch.where(ended, first_eos + 1, first_eos)
        token_logprobs = (
            self._sampled_logprobs(enc["input_ids"], enc["attention_mask"], completion_ids, lengths)
            if logprobs
            else None
        )
        samples = []
        for row in range(len(texts)):
            ids = completion_ids[row, : lengths[row]].tolist()
            text_ids = ids[:-1] if ended[row] else ids
            samples.append(
                Sample(
                    text=self.tokenizer.decode(text_ids, skip_special_tokens=True),
                    token_logprobs=token_logprobs[row][: len(ids)] if logprobs else None,
                    finish_reason="stop" if ended[row] else "length",
                    token_ids=ids,
                )
            )
        record_usage((self.usage, *current_usage_scopes()), int(enc["attention_mask"].sum()), int(lengths.sum()))
        return samples

    def _sampled_logprobs(self, prompt_ids, prompt_mask, completion_ids, lengths) -> list[list[float]]:
        """log p(completion_ids[b, t] | prefix) for every row b, from one forward pass over the padded batch."""
        import torch

        steps = completion_ids.shape[1]
        completion_mask = (torch.arange(steps, device=lengths.device)[None, :] < lengths[:, None]).to(
            prompt_mask.dtype
        )
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        # positions as `generate` numbers them under left padding: counting real tokens only
        position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                logits_to_keep=steps + 1,
            ).logits
        # logits at position i predict token i+1: keep the ones predicting the completion tokens; one row at a time
        # so that the float32 log-softmax never holds more than (steps x vocabulary)
        rows = []
        for row in range(logits.shape[0]):
            row_logprobs = torch.log_softmax(logits[row, -steps - 1 : -1, :].float(), dim=-1)
            rows.append(row_logprobs.gather(-1, completion_ids[row].unsqueeze(-1)).squeeze(-1).tolist())
        return rows
