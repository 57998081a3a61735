"""One declaration per training setting: every TrainSettings field is a YAML key, a `--set train.x=...` override
and an `alma-r train` flag, and a field added once (here in a temporary subclass) appears in all of them."""

from __future__ import annotations

import argparse
import functools
import json
from typing import Literal, get_args, get_origin

import pytest
from pydantic import BaseModel, Field

from alma_r.cli import main
from alma_r.cli.schema_args import _nested_model, _without_none, flag_name
from alma_r.cli.train import add_train_parser, settings_from_args
from alma_r.config import RunConfig, load_config
from alma_r.models.result_fields import non_result_fields
from alma_r.models.train.settings import NOT_IN_CHECKPOINT, TrainSettings

REQUIRED = ["--model", "m", "--data", "d.parquet", "--output", "out"]


def leaves(model: type[BaseModel], path: tuple[str, ...] = ()):
    """(path, field) of every scalar field, nested models walked into."""
    for name, field in model.model_fields.items():
        nested = _nested_model(field.annotation)
        if nested is not None:
            yield from leaves(nested, (*path, name))
        else:
            yield (*path, name), field


def sample_value(field):
    """A valid value other than the default, whatever the field's type."""
    annotation = _without_none(field.annotation)
    default = field.get_default(call_default_factory=True)
    if annotation is bool:
        return not default
    if get_origin(annotation) is Literal:
        choices = get_args(annotation)
        return choices[-1] if choices[-1] != default else choices[0]
    if get_origin(annotation) is list:
        return ["q_proj", "v_proj"]
    if annotation is int:
        return (default or 1) + 1
    if annotation is float:
        return default / 2 if default else 0.25
    raise AssertionError(f"no sample for {annotation!r}")


def flags_for(path: tuple[str, ...], value) -> list[str]:
    flag = flag_name(path)
    if isinstance(value, bool):
        return [flag if value else "--no-" + flag[2:]]
    if isinstance(value, list):
        return [flag, *map(str, value)]
    return [flag, str(value)]


def parse_train(argv: list[str], settings_class: type[TrainSettings] = TrainSettings):
    parser = argparse.ArgumentParser(prog="alma-r")
    train = add_train_parser(parser.add_subparsers(dest="command", required=True), settings_class)
    return parser.parse_args(["train", *REQUIRED, *argv]), train


def value_at(settings: BaseModel, path: tuple[str, ...]):
    return functools.reduce(getattr, path, settings)


LEAVES = list(leaves(TrainSettings))
# A field whose sample value is valid only with another field set too: that one's override and flag.
COMPANIONS = {("lora", "dropout"): (["train.disable_dropout=false"], ["--no-disable-dropout"])}


def test_every_field_has_a_described_flag_in_alma_r_train_help(capsys):
    with pytest.raises(SystemExit) as done:
        main(["train", "--help"])
    assert done.value.code == 0
    help_text = capsys.readouterr().out
    for path, field in LEAVES:
        assert field.description, f"train.{'.'.join(path)} has no description (its flag would have no help)"
        assert flag_name(path) in help_text, path
    for flag in ("--seed", "--dtype", "--trust-remote-code", "--model", "--data", "--output", "--adapter"):
        assert flag in help_text


@pytest.mark.parametrize("path,field", LEAVES, ids=[".".join(p) for p, _ in LEAVES])
def test_every_field_is_a_set_override_and_a_flag(path, field):
    value = sample_value(field)
    overrides, flags = COMPANIONS.get(path, ([], []))
    cfg = load_config(overrides=[f"train.{'.'.join(path)}={json.dumps(value)}", *overrides])
    assert value_at(cfg.train, path) == value
    args, _ = parse_train([*flags_for(path, value), *flags])
    settings, _ = settings_from_args(args)
    assert value_at(settings, path) == value


def test_flags_give_the_config_sections_settings():
    overrides, argv = [], []
    for path, field in LEAVES:
        value = sample_value(field)
        overrides.append(f"train.{'.'.join(path)}={json.dumps(value)}")
        argv += flags_for(path, value)
    cfg = load_config(
        overrides=[*overrides, "run.seed=5", "model.dtype=bfloat16", "model.trust_remote_code=true"]
    )
    settings, run_context = settings_from_args(
        parse_train([*argv, "--seed", "5", "--dtype", "bfloat16", "--trust-remote-code"])[0]
    )
    assert settings.model_dump() == cfg.train.model_dump()
    assert run_context == {"seed": 5, "dtype": "bfloat16", "trust_remote_code": True}
    # No flags: the config's defaults.
    defaults, context = settings_from_args(parse_train([])[0])
    assert defaults.model_dump() == RunConfig().train.model_dump()
    assert context == {"seed": RunConfig().run.seed, "dtype": "float32", "trust_remote_code": False}


def test_a_field_added_once_reaches_the_help_the_flags_the_config_and_the_fingerprint():
    class WithEntropyBonus(TrainSettings):
        entropy_bonus: float = Field(0.0, ge=0, description="A made-up knob of this test.")

    args, parser = parse_train(["--entropy-bonus", "0.3"], WithEntropyBonus)
    assert (
        "--entropy-bonus" in parser.format_help() and "A made-up knob of this test." in parser.format_help()
    )
    settings, _ = settings_from_args(args)
    assert isinstance(settings, WithEntropyBonus) and settings.entropy_bonus == 0.3
    assert settings.identity(seed=1) != WithEntropyBonus().identity(seed=1)  # a checkpoint notices it

    class Config(RunConfig):
        train: WithEntropyBonus = WithEntropyBonus()

    cfg = load_config(overrides=["train.entropy_bonus=0.3"], config_class=Config)
    assert cfg.train.model_dump() == settings.model_dump()


def test_trl_flag_names_and_switches_are_aliases():
    args, _ = parse_train(
        ["--lr-scheduler-type", "linear", "--num-train-epochs", "2", "--per-device-train-batch-size", "8"]
        + ["--bf16", "--no-lora"]
    )
    settings, _ = settings_from_args(args)
    assert (settings.lr_scheduler, settings.num_epochs, settings.batch_size) == ("linear", 2.0, 8)
    assert (settings.mixed_precision, settings.finetune) == ("bf16", "full")


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--beta", "0"], "--beta: Input should be greater than 0"),
        (["--max-prompt-length", "512"], "max_prompt_length (512) must be below max_length (512)"),
        (["--lora-r", "0"], "--lora-r: Input should be greater than or equal to 1"),
    ],
)
def test_an_invalid_flag_fails_with_its_name(argv, message):
    with pytest.raises(SystemExit) as failed:
        settings_from_args(parse_train(argv)[0])
    assert str(failed.value).startswith("alma-r train: ") and message in str(failed.value)


def test_new_lora_only_for_finetune_lora_without_a_continued_adapter():
    assert TrainSettings().new_lora(continues_adapter=False) == TrainSettings().lora
    assert TrainSettings().new_lora(continues_adapter=True) is None
    assert TrainSettings(finetune="full").new_lora(continues_adapter=False) is None


def test_fingerprint_covers_the_maths_and_the_run_context_only():
    base = TrainSettings()
    assert set(non_result_fields(TrainSettings)) == {
        "save_steps",
        "logging_steps",
        "logits_chunk_size",
        "pad_to_multiple_of",
        "activation_recompute",
    }
    assert not (NOT_IN_CHECKPOINT | set(non_result_fields(TrainSettings))) & set(base.identity())
    for name, value in {
        "save_steps": 7,
        "logging_steps": 3,
        "save_merged": True,
        "logits_chunk_size": 8,
        "pad_to_multiple_of": 1,
        "activation_recompute": "elementwise",
    }.items():
        assert TrainSettings(**{name: value}).identity(seed=1) == base.identity(seed=1), name
    assert TrainSettings(beta=0.2).identity(seed=1) != base.identity(seed=1)
    assert base.identity(seed=2) != base.identity(seed=1)
    assert base.identity(seed=1, dtype="bfloat16") != base.identity(seed=1, dtype="float32")


def test_simpo_gamma_beta_ratio_sets_gamma_for_simpo():
    assert TrainSettings(loss_type="simpo", beta=2.0, simpo_gamma_beta_ratio=0.25).simpo_gamma == 0.5
    assert TrainSettings(loss_type="sigmoid", simpo_gamma_beta_ratio=0.25).simpo_gamma == 0.5  # the default
