"""The config loader: precedence, override syntax, typing, every error message, --help and docs."""

import dataclasses
import typing
from pathlib import Path

import pytest

from titan_cp.config import JobConfig, format_help, load_config
from titan_cp.config.schema import Model
from titan_cp.context_parallel.kernels import IMPLEMENTATIONS

from tests.errors_utils import config_error, write_toml

DOCS = Path(__file__).resolve().parent.parent / "docs" / "config.md"


def all_keys() -> list[tuple[str, str]]:
    """Every (section, key) of the schema, read from the dataclasses themselves."""
    return [
        (section.name, f.name)
        for section in dataclasses.fields(JobConfig)
        for f in dataclasses.fields(section.default_factory)
    ]


# --- values, precedence and syntax ---


def test_no_arguments_gives_schema_defaults():
    assert load_config([]) == JobConfig()


def test_precedence_cli_over_toml_over_defaults(tmp_path):
    path = write_toml(tmp_path, "[training]\nsteps = 5\nseq_len = 64\n[optimizer]\nlr = 1e-3\n")
    cfg = load_config(["--job.config_file", path, "--training.steps", "7"])
    assert cfg.training.steps == 7  # CLI beats TOML
    assert cfg.training.seq_len == 64  # TOML beats default
    assert cfg.optimizer.lr == 1e-3
    assert cfg.training.local_batch_size == JobConfig().training.local_batch_size  # default
    assert cfg.job.config_file == path


def test_cli_precedence_does_not_depend_on_argument_order(tmp_path):
    path = write_toml(tmp_path, "[training]\nsteps = 5\n")
    assert load_config(["--training.steps=9", f"--job.config_file={path}"]).training.steps == 9


@pytest.mark.parametrize("argv", [["--training.steps", "7"], ["--training.steps=7"]])
def test_both_override_syntaxes(argv):
    assert load_config(argv).training.steps == 7


def test_equals_syntax_keeps_later_equals_signs_and_empty_values():
    cfg = load_config(["--job.description=a=b", "--checkpoint.initial_load_path="])
    assert cfg.job.description == "a=b"
    assert cfg.checkpoint.initial_load_path == ""


def test_negative_numbers_are_values_not_options():
    cfg = load_config(["--training.global_batch_size", "-1", "--checkpoint.load_step", "-1"])
    assert cfg.training.global_batch_size == -1
    assert cfg.checkpoint.load_step == -1


def test_last_repeated_override_wins():
    assert load_config(["--training.steps", "3", "--training.steps", "4"]).training.steps == 4


@pytest.mark.parametrize("text,value", [("true", True), ("false", False), ("TRUE", True), ("False", False)])
def test_bool_parsing(text, value):
    assert load_config(["--checkpoint.enable", text]).checkpoint.enable is value


@pytest.mark.parametrize("text", ["yes", "1", "0", "on", ""])
def test_bool_rejects_anything_but_true_false(text):
    message = config_error(["--checkpoint.enable", text])
    assert "--checkpoint.enable" in message and "true or false" in message


@pytest.mark.parametrize("text,value", [("1e-4", 1e-4), ("3", 3.0), ("0.5", 0.5)])
def test_float_parsing(text, value):
    lr = load_config(["--optimizer.lr", text]).optimizer.lr
    assert isinstance(lr, float) and lr == value


@pytest.mark.parametrize("text", ["abc", "nan", "inf", "1e-4x"])
def test_float_rejects_non_numbers(text):
    assert config_error(["--optimizer.lr", text]) == f"--optimizer.lr: expected a number, got {text!r}"


@pytest.mark.parametrize("text", ["abc", "5.0", "1e3"])
def test_int_rejects_non_integers(text):
    assert config_error(["--training.steps", text]) == f"--training.steps: expected an integer, got {text!r}"


def test_literal_choice_accepted():
    cfg = load_config(["--lr_scheduler.decay_type", "cosine", "--activation_checkpoint.mode=full"])
    assert cfg.lr_scheduler.decay_type == "cosine"
    assert cfg.activation_checkpoint.mode == "full"


def test_literal_choice_rejected_lists_the_choices():
    message = config_error(["--lr_scheduler.decay_type", "exp"])
    assert message == "--lr_scheduler.decay_type: expected one of linear, cosine, sqrt, got 'exp'"


def test_attn_implementation_choices_are_the_kernels_that_exist():
    """The schema's choices (for --help and validation) and the kernel registry must name the same kernels."""
    choices = typing.get_args(typing.get_type_hints(Model)["attn_implementation"])
    assert set(choices) == {"auto", *IMPLEMENTATIONS}


def test_toml_int_is_accepted_for_a_float(tmp_path):
    path = write_toml(tmp_path, "[optimizer]\nlr = 1\n")
    lr = load_config(["--job.config_file", path]).optimizer.lr
    assert isinstance(lr, float) and lr == 1.0


def test_toml_typed_values(tmp_path):
    path = write_toml(
        tmp_path,
        '[training]\nsample_packing = true\nmixed_precision_param = "float32"\n'
        '[parallelism]\ncontext_parallel_degree = 4\n',
    )
    cfg = load_config(["--job.config_file", path])
    assert cfg.training.sample_packing is True
    assert cfg.training.mixed_precision_param == "float32"
    assert cfg.parallelism.context_parallel_degree == 4


# --- errors ---


def test_missing_config_file_is_named(tmp_path):
    missing = str(tmp_path / "nope.toml")
    message = config_error(["--job.config_file", missing])
    assert missing in message and "not found" in message


def test_config_file_that_is_a_folder(tmp_path):
    assert str(tmp_path) in config_error(["--job.config_file", str(tmp_path)])


def test_invalid_toml_names_file_and_position(tmp_path):
    path = write_toml(tmp_path, "[training]\nsteps = \n")
    message = config_error(["--job.config_file", path])
    assert message.startswith(f"invalid TOML in {path}: ") and "line 2" in message


def test_non_utf8_toml(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_bytes(b'[job]\ndescription = "\xff"\n')
    assert config_error(["--job.config_file", str(path)]).startswith(f"invalid TOML in {path}")


def test_unknown_toml_key_names_key_file_and_valid_keys(tmp_path):
    path = write_toml(tmp_path, "[training]\nstepz = 3\n")
    message = config_error(["--job.config_file", path])
    assert message.startswith(f"unknown key 'training.stepz' in {path}; valid keys in [training]: ")
    for _, key in filter(lambda k: k[0] == "training", all_keys()):
        assert key in message
    assert "did you mean 'steps'?" in message


def test_unknown_toml_section(tmp_path):
    path = write_toml(tmp_path, "[trainin]\nsteps = 3\n")
    message = config_error(["--job.config_file", path])
    assert message.startswith(f"unknown section [trainin] in {path}; valid sections: job, model,")
    assert "did you mean 'training'?" in message


def test_toml_top_level_value_instead_of_section(tmp_path):
    path = write_toml(tmp_path, "training = 3\n")
    message = config_error(["--job.config_file", path])
    assert "'training'" in message and path in message and "[training] table" in message


@pytest.mark.parametrize(
    "toml,expected",
    [
        ('[training]\nsteps = "abc"\n', "training.steps in {}: expected an integer, got 'abc'"),
        ("[training]\nsteps = 1.5\n", "training.steps in {}: expected an integer, got 1.5"),
        ("[training]\nsteps = true\n", "training.steps in {}: expected an integer, got True"),
        ('[optimizer]\nlr = "1e-4"\n', "optimizer.lr in {}: expected a number, got '1e-4'"),
        ("[optimizer]\nlr = true\n", "optimizer.lr in {}: expected a number, got True"),
        ('[checkpoint]\nenable = "true"\n', "checkpoint.enable in {}: expected true or false, got 'true'"),
        ("[job]\ndump_folder = 3\n", "job.dump_folder in {}: expected a string, got 3"),
        (
            '[activation_checkpoint]\nmode = "some"\n',
            "activation_checkpoint.mode in {}: expected one of auto, none, selective, full, full_except_attention, got 'some'",
        ),
    ],
)
def test_wrong_toml_value_type_names_file_and_key(tmp_path, toml, expected):
    path = write_toml(tmp_path, toml)
    assert config_error(["--job.config_file", path]) == expected.format(path)


def test_config_file_inside_toml_is_refused(tmp_path):
    path = write_toml(tmp_path, '[job]\nconfig_file = "other.toml"\n')
    message = config_error(["--job.config_file", path])
    assert "job.config_file" in message and path in message


def test_unknown_override_suggests_closest_key():
    message = config_error(["--training.stepz", "3"])
    assert message.startswith("unknown option '--training.stepz'; did you mean '--training.steps'?")


def test_unknown_override_without_close_match():
    message = config_error(["--zzz.qqq", "3"])
    assert message.startswith("unknown option '--zzz.qqq'") and "did you mean" not in message


def test_unknown_override_with_equals_syntax_is_named_without_value():
    assert config_error(["--training.stepz=3"]).startswith("unknown option '--training.stepz'")


@pytest.mark.parametrize("argv", [["--training.steps"], ["--training.steps", "--optimizer.lr", "1"]])
def test_missing_value_after_option(argv):
    assert config_error(argv) == "--training.steps: missing value; expected an integer"


def test_positional_argument_is_an_error():
    message = config_error(["train.toml"])
    assert "'train.toml'" in message and "--job.config_file" in message
    assert "'foo'" in config_error(["--training.steps", "3", "foo"])


# Every range check: a bad value must fail naming the key, the edge value must pass.
RANGES = [
    ("training.steps", "0", "1"),
    ("training.steps", "-5", "1"),
    ("training.seq_len", "0", "1"),
    ("training.local_batch_size", "0", "1"),
    ("training.global_batch_size", "0", "-1"),
    ("training.global_batch_size", "-2", "1"),
    ("training.loss_chunk_size", "-1", "0"),
    ("training.max_norm", "-0.5", "0"),
    ("optimizer.lr", "0", "1e-9"),
    ("optimizer.lr", "-1e-4", "1e-4"),
    ("optimizer.beta1", "1", "0"),
    ("optimizer.beta2", "-0.1", "0.999"),
    ("optimizer.eps", "0", "1e-12"),
    ("optimizer.weight_decay", "-0.1", "0"),
    ("metrics.log_freq", "0", "1"),
    ("parallelism.data_parallel_replicate_degree", "0", "1"),
    ("parallelism.context_parallel_degree", "0", "1"),
    ("parallelism.context_parallel_degree", "-1", "2"),
    ("parallelism.context_parallel_ulysses_degree", "0", "1"),
    ("parallelism.data_parallel_shard_degree", "0", "-1"),
    ("parallelism.data_parallel_shard_degree", "-2", "1"),
    ("parallelism.heads_k_stride", "-1", "0"),
    ("float8.filter_fqns", "output,", "output,w2"),
    ("checkpoint.interval", "0", "1"),
    ("checkpoint.keep_latest_k", "-1", "0"),
    ("checkpoint.load_step", "-2", "0"),
    ("comm.init_timeout_seconds", "0", "1"),
    ("comm.train_timeout_seconds", "0", "1"),
    ("profiling.profile_freq", "1", "2"),
    ("lr_scheduler.warmup_steps", "-1", "0"),
    ("lr_scheduler.decay_ratio", "1.5", "1"),
    ("lr_scheduler.decay_ratio", "-0.5", "-1"),
    ("lr_scheduler.decay_ratio", "-2", "0"),
    ("lr_scheduler.min_lr_factor", "1.1", "1"),
    ("lr_scheduler.min_lr_factor", "-0.1", "0"),
]


@pytest.mark.parametrize("key,bad,good", RANGES)
def test_range_validation(key, bad, good):
    message = config_error([f"--{key}", bad])
    assert message.startswith(f"{key} must be ") and f"(from --{key})" in message
    load_config([f"--{key}", good])


def test_range_error_names_the_toml_file_it_came_from(tmp_path):
    path = write_toml(tmp_path, "[training]\nsteps = 0\n")
    assert config_error(["--job.config_file", path]) == f"training.steps must be >= 1, got 0 (from {path})"


# --- help, docs and dict form ---


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_every_key_and_exits_zero(flag, capsys):
    with pytest.raises(SystemExit) as info:
        load_config(["--training.stepz", "oops", flag])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for section, key in all_keys():
        assert f"\n  --{section}.{key} " in out, f"--{section}.{key} missing from --help"
        assert f"\n[{section}]\n" in out


def test_help_shows_type_default_and_help_text():
    text = format_help()
    assert "  --training.steps int (default: 10000)  optimizer steps to train\n" in text
    assert "  --checkpoint.enable bool (default: false)  " in text
    assert '  --lr_scheduler.decay_type {linear,cosine,sqrt} (default: "linear")  shape of the decay\n' in text


def test_docs_config_md_is_in_sync_with_the_schema():
    docs = DOCS.read_text()
    for section, key in all_keys():
        assert f"--{section}.{key} " in docs, f"docs/config.md lacks --{section}.{key}"
    assert format_help() in docs, (
        "docs/config.md is out of date: paste the output of "
        "`python -c 'from titan_cp.config import format_help; print(format_help(), end=\"\")'`"
    )
