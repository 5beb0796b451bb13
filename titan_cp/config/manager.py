"""Build a `JobConfig` from defaults, a TOML file and `--section.key value` overrides.

Precedence is command line > TOML > schema defaults. Every value is typed and checked against
the schema in `schema.py`, and every mistake becomes a one-line `UserError` naming the key and
where it came from (invariant 7 in docs/architecture.md). Checks that need the world size or the model live
with the parts that know them.
"""

import dataclasses
import difflib
import math
import sys
import types
import typing
from typing import Any, Literal

from titan_cp.config.schema import JobConfig
from titan_cp.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, packaged separately
    import tomli as tomllib

CONFIG_FILE_KEY = "job.config_file"


@dataclasses.dataclass(frozen=True)
class _Key:
    """One config key: where it lives in `JobConfig` and what it accepts."""

    section: str
    name: str
    type: Any
    default: Any
    help: str

    @property
    def full(self) -> str:
        return f"{self.section}.{self.name}"


def _schema_keys() -> dict[str, dict[str, _Key]]:
    """Every key of the schema, by section, in declaration order."""
    sections: dict[str, dict[str, _Key]] = {}
    for section_field in dataclasses.fields(JobConfig):
        section_cls = section_field.default_factory
        hints = typing.get_type_hints(section_cls)
        defaults = section_cls()
        sections[section_field.name] = {
            f.name: _Key(
                section_field.name,
                f.name,
                hints[f.name],
                getattr(defaults, f.name),
                f.metadata.get("help", ""),
            )
            for f in dataclasses.fields(section_cls)
        }
    return sections


def _choices(tp: Any) -> tuple | None:
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else None


def _is_auto_bool(tp: Any) -> bool:
    """`bool | Literal["auto"]` (schema.AutoBool): true, false, or auto."""
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and set(typing.get_args(tp)) == {
        bool,
        Literal["auto"],
    }


def _list_item(tp: Any) -> Any:
    """The item type of a `list[...]` key, None for any other key."""
    return typing.get_args(tp)[0] if typing.get_origin(tp) is list else None


def _type_name(tp: Any) -> str:
    choices = _choices(tp)
    if choices is not None:
        return "{" + ",".join(str(c) for c in choices) + "}"
    if _is_auto_bool(tp):
        return "{true,false,auto}"
    item = _list_item(tp)
    if item is not None:
        return f"list[{_type_name(item)}]"
    return tp.__name__


def _expected(tp: Any) -> str:
    """What a value of this type looks like, for error messages."""
    choices = _choices(tp)
    if choices is not None:
        return "one of " + ", ".join(str(c) for c in choices)
    if _is_auto_bool(tp):
        return "true, false or auto"
    item = _list_item(tp)
    if item is not None:
        return f"a list (TOML array, or comma-separated on the command line) of {_expected(item)}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[tp]


def _format_default(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(_format_default(v) for v in value) + "]"
    return repr(value)


def _parse_cli_value(key: _Key, text: str) -> Any:
    """Turn the text after `--section.key` into a value of the key's type."""
    bad = UserError(f"--{key.full}: expected {_expected(key.type)}, got {text!r}")
    item = _list_item(key.type)
    if item is not None:
        # "a,b" -> ["a", "b"]; an empty value is the empty list.
        items = [part.strip() for part in text.split(",")] if text.strip() else []
        return [_parse_cli_value(dataclasses.replace(key, type=item), part) for part in items]
    choices = _choices(key.type)
    if choices is not None:
        if text not in choices:
            raise bad
        return text
    if key.type is bool or _is_auto_bool(key.type):
        lowered = text.strip().lower()
        if lowered == "auto" and _is_auto_bool(key.type):
            return "auto"
        if lowered not in ("true", "false"):
            raise bad
        return lowered == "true"
    if key.type is int:
        try:
            return int(text)
        except ValueError:
            raise bad from None
    if key.type is float:
        try:
            value = float(text)
        except ValueError:
            raise bad from None
        if not math.isfinite(value):
            raise bad
        return value
    return text


def _check_toml_value(key: _Key, value: Any, path: str) -> Any:
    """Check a TOML value against the key's type; ints are accepted where floats are expected."""
    tp = key.type
    item = _list_item(tp)
    if item is not None:
        if not isinstance(value, list):
            raise UserError(f"{key.full} in {path}: expected {_expected(tp)}, got {value!r}")
        return [_check_toml_value(dataclasses.replace(key, type=item), v, path) for v in value]
    choices = _choices(tp)
    if choices is not None:
        if isinstance(value, bool) and ("true" in choices or "false" in choices):
            value = "true" if value else "false"  # a tri-state key: `key = false` in TOML is the choice
        ok = isinstance(value, str) and value in choices
    elif _is_auto_bool(tp):
        ok = isinstance(value, bool) or value == "auto"
    elif tp is float:
        # bool is an int subclass in Python, but `lr = true` is a mistake, not 1.0.
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        value = float(value) if ok else value
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, tp)
    if not ok:
        raise UserError(f"{key.full} in {path}: expected {_expected(tp)}, got {value!r}")
    return value


def _suggest(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


def _parse_argv(argv: list[str], keys: dict[str, dict[str, _Key]]) -> dict[str, Any]:
    """Read `--section.key value` / `--section.key=value` pairs into {full key: typed value}."""
    all_keys = [f"--{k.full}" for section in keys.values() for k in section.values()]
    overrides: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--"):
            hint = " (pass a TOML file as --job.config_file FILE)" if token.endswith(".toml") else ""
            raise UserError(
                f"unexpected argument {token!r}; options look like --section.key value{hint}"
            )
        name, has_eq, text = token[2:].partition("=")
        section, _, key_name = name.partition(".")
        key = keys.get(section, {}).get(key_name)
        if key is None:
            raise UserError(
                f"unknown option '--{name}'{_suggest('--' + name, all_keys)} (--help lists every key)"
            )
        if not has_eq:
            # A value may start with a single '-' (e.g. -1) but never with '--'.
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise UserError(f"--{name}: missing value; expected {_expected(key.type)}")
            i += 1
            text = argv[i]
        overrides[key.full] = _parse_cli_value(key, text)
        i += 1
    return overrides


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise UserError(f"config file '{path}' not found (--{CONFIG_FILE_KEY})") from None
    except OSError as e:
        raise UserError(f"cannot read config file '{path}' (--{CONFIG_FILE_KEY}): {e.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        message = " ".join(str(e).split())
        raise UserError(f"invalid TOML in {path}: {message}") from None


def _toml_values(data: dict[str, Any], path: str, keys: dict[str, dict[str, _Key]]) -> dict[str, Any]:
    """Check a parsed TOML document against the schema and flatten it to {full key: value}."""
    values: dict[str, Any] = {}
    for section, table in data.items():
        if section not in keys:
            raise UserError(
                f"unknown section [{section}] in {path}; valid sections: {', '.join(keys)}"
                f"{_suggest(section, list(keys))}"
            )
        if not isinstance(table, dict):
            raise UserError(f"'{section}' in {path} must be a [{section}] table, got {table!r}")
        for name, value in table.items():
            key = keys[section].get(name)
            if key is None:
                raise UserError(
                    f"unknown key '{section}.{name}' in {path}; valid keys in [{section}]:"
                    f" {', '.join(keys[section])}{_suggest(name, list(keys[section]))}"
                )
            if key.full == CONFIG_FILE_KEY:
                raise UserError(f"{CONFIG_FILE_KEY} cannot be set inside {path}; pass it on the command line")
            values[key.full] = _check_toml_value(key, value, path)
    return values


def _validate(cfg: JobConfig, source: dict[str, str]) -> None:
    """Range checks that need only the config itself."""

    def check(key: str, ok: bool, valid: str) -> None:
        if not ok:
            section, name = key.split(".")
            value = getattr(getattr(cfg, section), name)
            raise UserError(f"{key} must be {valid}, got {value!r} (from {source.get(key, 'defaults')})")

    t, o, lr, p = cfg.training, cfg.optimizer, cfg.lr_scheduler, cfg.parallelism
    check("training.steps", t.steps >= 1, ">= 1")
    check("training.seq_len", t.seq_len >= 1, ">= 1")
    check("training.local_batch_size", t.local_batch_size >= 1, ">= 1")
    check("training.global_batch_size", t.global_batch_size == -1 or t.global_batch_size >= 1, "-1 or >= 1")
    check("training.loss_chunk_size", t.loss_chunk_size >= 0, ">= 0 (0 computes all logits at once)")
    check("training.mlp_chunk_size", t.mlp_chunk_size >= 0, ">= 0 (0 runs the feed-forward in one piece)")
    check("training.max_norm", t.max_norm >= 0, ">= 0 (0 disables clipping)")
    check("optimizer.lr", o.lr > 0, "> 0")
    check("optimizer.beta1", 0 <= o.beta1 < 1, "in [0, 1)")
    check("optimizer.beta2", 0 <= o.beta2 < 1, "in [0, 1)")
    check("optimizer.eps", o.eps > 0, "> 0")
    check("optimizer.weight_decay", o.weight_decay >= 0, ">= 0")
    check("lr_scheduler.warmup_steps", lr.warmup_steps >= 0, ">= 0")
    check("lr_scheduler.decay_ratio", lr.decay_ratio == -1 or 0 <= lr.decay_ratio <= 1, "-1 or in [0, 1]")
    check("lr_scheduler.min_lr_factor", 0 <= lr.min_lr_factor <= 1, "in [0, 1]")
    check("metrics.log_freq", cfg.metrics.log_freq >= 1, ">= 1")
    check(
        "parallelism.data_parallel_replicate_degree", p.data_parallel_replicate_degree >= 1, ">= 1"
    )
    check(
        "parallelism.data_parallel_shard_degree",
        p.data_parallel_shard_degree == -1 or p.data_parallel_shard_degree >= 1,
        "-1 (fill the world size) or >= 1",
    )
    check("parallelism.context_parallel_degree", p.context_parallel_degree >= 1, ">= 1")
    check("parallelism.context_parallel_ulysses_degree", p.context_parallel_ulysses_degree >= 1, ">= 1")
    check("parallelism.fsdp_prefetch", p.fsdp_prefetch >= 0, ">= 0 (0 leaves prefetching to FSDP2)")
    check("parallelism.heads_k_stride", p.heads_k_stride >= 0, "0 (all KV heads at once) or >= 1")
    check(
        "float8.filter_fqns",
        all(cfg.float8.filter_fqns),
        "names (or parts of names) of linear layers, none empty: an empty one would match every layer",
    )
    check("checkpoint.interval", cfg.checkpoint.interval >= 1, ">= 1")
    check("checkpoint.keep_latest_k", cfg.checkpoint.keep_latest_k >= 0, ">= 0 (0 keeps all)")
    check("checkpoint.load_step", cfg.checkpoint.load_step >= -1, "-1 (latest) or >= 0")
    check("comm.init_timeout_seconds", cfg.comm.init_timeout_seconds >= 1, ">= 1")
    check("comm.train_timeout_seconds", cfg.comm.train_timeout_seconds >= 1, ">= 1")
    check("profiling.profile_freq", cfg.profiling.profile_freq >= 2, ">= 2 (a warm-up step precedes each traced step)")


def format_help() -> str:
    """The `--help` text: every key with its type, default and help, grouped by section."""
    lines = [
        "usage: run_train.sh [--job.config_file FILE] [--section.key VALUE | --section.key=VALUE ...]",
        "precedence: command line > TOML file > defaults; booleans are true or false",
    ]
    for section, section_keys in _schema_keys().items():
        lines.append("")
        lines.append(f"[{section}]")
        for key in section_keys.values():
            lines.append(
                f"  --{key.full} {_type_name(key.type)} (default: {_format_default(key.default)})  {key.help}"
            )
    return "\n".join(lines) + "\n"


def load_config(argv: list[str]) -> JobConfig:
    """Build the run's config from `argv` (without the program name).

    `--help`/`-h` prints `format_help()` and raises `SystemExit(0)`. Any mistake raises `UserError`.
    """
    if "--help" in argv or "-h" in argv:
        sys.stdout.write(format_help())
        raise SystemExit(0)
    keys = _schema_keys()
    overrides = _parse_argv(argv, keys)
    source = {k: f"--{k}" for k in overrides}
    values: dict[str, Any] = {}
    path = overrides.get(CONFIG_FILE_KEY, "")
    if path:
        values = _toml_values(_read_toml(path), path, keys)
        source = {k: path for k in values} | source
    values |= overrides

    cfg = JobConfig()
    for full, value in values.items():
        section, name = full.split(".")
        setattr(getattr(cfg, section), name, value)
    _validate(cfg, source)
    return cfg
