"""Settings: profiles load, overrides parse, every problem is reported at once."""

import pytest

from medvl.core.settings import SettingsError, available_profiles, load_settings

from conftest import phase_script


def test_profiles_load_and_carry_the_seed_hyperparameters():
    assert {"tiny", "7b", "7b-random"} <= set(available_profiles())
    seven = load_settings("7b")
    t = seven.train
    assert (t.lora_r, t.lora_alpha, t.lora_dropout) == (64, 128, 0.05)
    assert (t.epochs, t.per_device_batch_size, t.grad_accum_steps) == (2, 2, 8)
    assert (t.learning_rate, t.warmup_ratio, t.weight_decay, t.max_length) == (1e-4, 0.05, 0.01, 1024)
    assert (t.save_steps, t.save_total_limit) == (200, 3)
    assert seven.model.source == "hub" and seven.model.require_cuda
    assert load_settings("7b-random").model.standin_architecture == "7b"
    assert load_settings("7b-random").model.standin_tokenizer == "qwen2.5"
    assert load_settings("tiny").model.standin_tokenizer == "trained"


def test_stand_in_tokenizer_choice_is_checked():
    with pytest.raises(SettingsError, match="standin_tokenizer: must be 'trained' or 'qwen2.5'"):
        load_settings("tiny", ["model.standin_tokenizer=gpt2"])
    # a vocabulary size would be silently ignored by the real tokenizer: refused instead
    with pytest.raises(SettingsError, match="applies only to standin_tokenizer 'trained'"):
        load_settings("7b-random", ["model.standin_tokenizer_vocab=8192"])


def test_overrides_are_parsed_to_the_field_types():
    s = load_settings("tiny", ["train.lora_r=8", "train.learning_rate=3e-4",
                               "train.gradient_checkpointing=true", "model.slug=other"])
    assert s.train.lora_r == 8 and s.train.learning_rate == 3e-4
    assert s.train.gradient_checkpointing is True and s.model.slug == "other"


def test_every_problem_is_reported_together():
    with pytest.raises(SettingsError) as err:
        load_settings("tiny", ["train.nope=1", "train.lora_r=abc", "bogus.x=1", "noequals",
                               "model.max_pixels=10"])
    text = str(err.value)
    for fragment in ("train.nope: unknown setting", "train.lora_r: expected an integer",
                     "unknown section 'bogus'", "expected section.key=value"):
        assert fragment in text, text
    assert len(err.value.problems) == 4  # range checks run only once types are right


def test_range_checks_collect_all_problems():
    with pytest.raises(SettingsError) as err:
        load_settings("tiny", ["model.max_pixels=1000", "train.lora_dropout=1.5", "api.port=0",
                               "bench.eval_also_forms=fp8,awq"])
    assert len(err.value.problems) == 4, err.value.problems
    assert "bench.eval_also_forms: awq not among the forms made at load (int4, fp8)" in err.value.problems
    assert load_settings("tiny", ["bench.eval_also_forms= fp8, int4"]).bench.also_forms() == ["fp8", "int4"]


def test_unknown_profile_names_the_available_ones():
    with pytest.raises(SettingsError, match="available: .*tiny"):
        load_settings("nope")


def test_fingerprint_moves_only_with_the_sections_that_matter():
    base = load_settings("tiny")
    other_port = load_settings("tiny", ["api.port=9000"])
    other_rank = load_settings("tiny", ["train.lora_r=8"])
    assert base.fingerprint(["model", "train"]) == other_port.fingerprint(["model", "train"])
    assert base.fingerprint(["model", "train"]) != other_rank.fingerprint(["model", "train"])
    assert base.fingerprint() != other_port.fingerprint()


def test_phase_script_rejects_bad_settings_before_any_work(tmp_path):
    result = phase_script(2, tmp_path, "--set", "model.nope=1", "--set", "train.lora_r=abc")
    assert result.returncode == 2
    assert "model.nope: unknown setting" in result.stderr
    assert "train.lora_r: expected an integer" in result.stderr
    assert not (tmp_path / "models").exists() and not (tmp_path / "benchmarks").exists()
