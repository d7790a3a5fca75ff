import dataclasses
import pathlib

from transformers import TrainingArguments

from tuna_trl import TunaConfig


ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_every_tuna_field_is_documented_with_help():
    base = {f.name for f in dataclasses.fields(TrainingArguments)}
    reference = (ROOT / "docs" / "config.md").read_text()
    for f in dataclasses.fields(TunaConfig):
        if f.name not in base:
            assert f.metadata.get("help"), f"TunaConfig.{f.name} has no help text"
            assert f"`{f.name}`" in reference, f"docs/config.md does not document {f.name}"


def test_readme_starts_with_the_two_commands():
    head = (ROOT / "README.md").read_text().split("\n\n")[1]
    assert "make demo" in head and "make test" in head
