"""Row validation, tokenization boundaries, truncation and dataset preparation."""

import logging

import pytest
from datasets import Dataset, IterableDataset

from tuna_trl import TunaConfig, TunaRankTrainer
from tuna_trl.tokenization import prepare_dataset, tokenize_row


GOOD = {"prompt": "add 1 and 1", "completions": ["2", "3"], "reference": "1 + 1 = 2"}


@pytest.mark.parametrize(
    "row, match",
    [
        ({"completions": ["a"]}, r"Row 3, field 'prompt': missing"),
        ({"prompt": "", "completions": ["a"]}, r"Row 3, field 'prompt'"),
        ({"prompt": "p", "completions": []}, r"Row 3, field 'completions': expected a non-empty list"),
        ({"prompt": "p", "completions": "a"}, r"Row 3, field 'completions': expected a non-empty list"),
        ({"prompt": "p", "completions": ["a", 7]}, r"Row 3, field 'completions\[1\]': expected a string"),
        ({"prompt": "p", "completions": ["a", "  "]}, r"Row 3, field 'completions\[1\]': the text is empty"),
        ({"prompt": "p", "completions": ["a"], "reference": ["a"]}, r"Row 3, field 'reference': expected a string"),
        ({"prompt": [{"role": "user", "content": "hi"}], "completions": ["a"]}, r"Row 3, field 'completions\[0\]'"),
        ({"prompt": [{"role": "user", "content": "hi"}], "completions": [[{"role": "assistant", "content": "a"}]],
          "reference": "a"}, r"Row 3, field 'reference'"),
    ],
)  # fmt: skip
def test_bad_rows_name_row_and_field(tokenizer, row, match):
    with pytest.raises(ValueError, match=match):
        tokenize_row(row, tokenizer, index=3)


def test_bad_row_in_a_dataset_names_its_index(tmp_path, tokenizer):
    rows = [GOOD, GOOD, {"prompt": "p", "completions": ["ok", ""], "reference": None}]
    args = TunaConfig(output_dir=str(tmp_path), use_cpu=True)
    with pytest.raises(ValueError, match=r"Row 2, field 'completions\[1\]'"):
        prepare_dataset(Dataset.from_list(rows), tokenizer, args)


def test_boundary_is_exact_and_eos_is_appended(tokenizer):
    out = tokenize_row(GOOD, tokenizer)
    assert out["prompt_ids"] == tokenizer("add 1 and 1")["input_ids"]
    assert out["prompt_ids"][0] == tokenizer.bos_token_id
    assert out["completion_ids"][0] == tokenizer("2", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert out["reference_ids"][-1] == tokenizer.eos_token_id
    assert tokenize_row({"prompt": "p", "completions": ["a"]}, tokenizer)["reference_ids"] == []


def test_conversational_rows_use_the_chat_template(tokenizer):
    prompt = [{"role": "user", "content": "add 1 and 1"}]
    row = {"prompt": prompt, "completions": [[{"role": "assistant", "content": "2"}]]}
    out = tokenize_row(row, tokenizer)
    rendered = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    assert out["prompt_ids"] == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    full = tokenizer.apply_chat_template(prompt + row["completions"][0], tokenize=False)
    completion = tokenizer.decode(out["completion_ids"][0][:-1])
    assert rendered + completion == full


def test_truncation_drops_rows_with_one_warning(tmp_path, tokenizer, caplog):
    long_prompt = "word " * 40
    rows = [GOOD, {"prompt": long_prompt, "completions": ["a", "b"], "reference": None}, GOOD]
    args = TunaConfig(output_dir=str(tmp_path), use_cpu=True, max_length=12, max_completions=1)
    with caplog.at_level(logging.WARNING):
        out = prepare_dataset(Dataset.from_list(rows), tokenizer, args)
    assert len(out) == 2
    assert [r.getMessage() for r in caplog.records if "Dropped" in r.getMessage()] == [
        "Dropped 1 of 3 train rows: max_length=12 leaves no room for a completion after the prompt."
    ]
    for row in out:
        assert len(row["completion_ids"]) == 1
        assert len(row["prompt_ids"]) + len(row["completion_ids"][0]) <= 12
    args = TunaConfig(output_dir=str(tmp_path), use_cpu=True, max_prompt_length=5, max_length=None)
    assert len(prepare_dataset(Dataset.from_list(rows), tokenizer, args)[1]["prompt_ids"]) == 5


def test_pretokenized_and_iterable_datasets_train(tmp_path, tokenizer, make_model):
    ids = tokenize_row(GOOD, tokenizer)
    pretokenized = Dataset.from_list([ids] * 4)
    args = TunaConfig(output_dir=str(tmp_path), use_cpu=True, max_steps=2, per_device_train_batch_size=2,
                      report_to=[], save_strategy="no")  # fmt: skip
    trainer = TunaRankTrainer(make_model(), args=args, train_dataset=pretokenized, processing_class=tokenizer)
    assert trainer.train_dataset[0]["completion_ids"] == ids["completion_ids"]
    trainer.train()

    def gen():
        for _ in range(8):
            yield GOOD

    iterable = IterableDataset.from_generator(gen)
    trainer = TunaRankTrainer(make_model(), args=args, train_dataset=iterable, processing_class=tokenizer)
    trainer.train()
    assert trainer.state.global_step == 2
