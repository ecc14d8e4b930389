"""YAML run config + dotted command-line overrides → a typed, validated `Config`.

Hand-written rather than OmegaConf: we want one-line errors that name the key, suggest the
nearest valid one (also across sections: `train.seed` → `run.seed`), accept YAML's quirks
(`3e-4` parses as a string in YAML 1.1) and resolve ZeRO presets, none of which OmegaConf's
structured configs do.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from ds_train.config.aliases import alias_of
from ds_train.config.schema import SECTIONS, Config

# Fields holding local paths: resolved to absolute paths at load time so the resolved config
# (written into the run dir and every checkpoint) means the same thing from any directory.
PATH_FIELDS = {
    ("run", "output_dir"),
    ("run", "start_from"),
    ("model", "config"),
    ("model", "init_from"),
    ("model", "tokenizer"),
    ("data", "cache_dir"),
    ("data", "downstream"),
    ("zero", "nvme_path"),
}


class ConfigError(ValueError):
    """A problem with the user's config, reported as one line without a traceback."""


def repo_configs_dir() -> Path:
    """The `configs/` folder shipped beside the package (ZeRO presets, model configs)."""
    env = os.environ.get("DS_TRAIN_CONFIGS")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "configs"


def load_config(
    path: str | os.PathLike | None, overrides: typing.Sequence[str] = (), base: dict | None = None
) -> Config:
    """Read a YAML run config, apply `a.b=value` overrides, resolve presets, type-check.

    `base` is a dict of defaults applied under the file (used by entry points that
    pre-fill sections). Raises ConfigError with a one-line message.
    """
    raw: dict = _deep_copy(base or {})
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections ({', '.join(SECTIONS)})")
        deep_merge(raw, loaded)
    for item in overrides:
        _apply_override(raw, item)
    _resolve_zero_preset(raw)
    return from_dict(raw)


def from_dict(raw: dict) -> Config:
    """Build a typed Config from nested dicts, with one-line errors for unknown keys and types."""
    if not isinstance(raw, dict):
        raise ConfigError("the config must be a mapping of sections")
    sections = {}
    for name, value in raw.items():
        if name not in SECTIONS:
            # a flat key pasted from another stack's config (`learning_rate:` at the top)
            hint = _suggest_alias(name) or suggest(name, list(SECTIONS))
            raise ConfigError(f"unknown config section '{name}'{hint}")
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"section '{name}' must be a mapping, got {type(value).__name__}")
        sections[name] = _build_section(name, SECTIONS[name], value)
    cfg = Config(**sections)
    _absolutise_paths(cfg)
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config) -> str:
    """The config as YAML that loads back to the same run. A length given in train.epochs is
    written as that (the resolved train.max_steps in a comment): both set would be refused."""
    raw = to_dict(cfg)
    if getattr(cfg.train, "from_epochs", False):
        raw["train"]["max_steps"] = None
        head = f"# train.max_steps={cfg.train.max_steps}, resolved from train.epochs={cfg.train.epochs:g}\n"
        return head + yaml.safe_dump(raw, sort_keys=False)
    return yaml.safe_dump(raw, sort_keys=False)


def all_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def describe() -> str:
    """Every config key with its type, default and documentation."""
    from ds_train.config.validate import REQUIRED_KEYS

    lines = []
    for sname, cls in SECTIONS.items():
        lines.append(f"{sname}:")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            key = f"{sname}.{f.name}"
            shown = "REQUIRED" if key in REQUIRED_KEYS else repr(default)
            if key == "data.train":  # finetune reads finetune.train_file instead
                shown = "REQUIRED for pretrain"
            lines.append(f"  {f.name}: {_type_name(hints[f.name])} = {shown}")
            lines.append(f"      {f.metadata.get('doc', '')}")
    return "\n".join(lines)


# --- overrides ----------------------------------------------------------------------------------


def _apply_override(raw: dict, item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like section.key=value (e.g. train.max_steps=20)")
    key, _, text = item.partition("=")
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"override '{item}': the key must be dotted, like train.max_steps")
    value = _override_value(parts, text)
    node = raw
    for part in parts[:-1]:
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override '{item}': '{part}' is not a section")
        node = nxt
    node[parts[-1]] = value


def _override_value(parts: list[str], text: str) -> Any:
    """The value of `key=text`: YAML, except for a text setting, which takes the text as written:
    YAML made `run.name=2024` a number (refused: expected a string) and cut `run.name=a #3` at its
    comment (sweep audit). Quotes and null still read as YAML does."""
    stripped = text.strip()
    quoted = len(stripped) > 1 and stripped[0] == stripped[-1] and stripped[0] in "\"'"
    if _is_text_setting(parts) and not quoted:
        return None if stripped in ("null", "Null", "NULL", "~") else stripped
    try:
        return yaml.safe_load(text) if stripped else ""
    except yaml.YAMLError:
        return text


def _is_text_setting(parts: list[str]) -> bool:
    if len(parts) != 2 or parts[0] not in SECTIONS:
        return False
    tp = typing.get_type_hints(SECTIONS[parts[0]]).get(parts[1])
    if get_origin(tp) in (typing.Union, types.UnionType):
        return set(get_args(tp)) == {str, type(None)}
    return tp is str


def _resolve_zero_preset(raw: dict) -> None:
    zero = raw.get("zero")
    if not isinstance(zero, dict) or not zero.get("preset"):
        return
    name = str(zero["preset"])
    candidates = [
        Path(name),
        repo_configs_dir() / "zero" / f"{name}.yaml",
        repo_configs_dir() / "zero" / name,
    ]
    path = next((c for c in candidates if c.is_file()), None)
    if path is None:
        available = sorted(p.stem for p in (repo_configs_dir() / "zero").glob("*.yaml"))
        raise ConfigError(
            f"zero.preset '{name}' not found{suggest(name, available)} (available: {', '.join(available)})"
        )
    preset = yaml.safe_load(path.read_text()) or {}
    if not isinstance(preset, dict):
        raise ConfigError(f"ZeRO preset {path} must be a mapping of zero.* keys")
    if "preset" in preset:
        raise ConfigError(f"ZeRO preset {path} must not name another preset")
    for key in preset:
        if key not in {f.name for f in dataclasses.fields(SECTIONS["zero"])}:
            raise ConfigError(f"ZeRO preset {path}: unknown key 'zero.{key}'")
    # The preset gives defaults; keys set explicitly in the run config or on the command line win.
    merged = _deep_copy(preset)
    deep_merge(merged, {k: v for k, v in zero.items()})
    merged["preset"] = name
    raw["zero"] = merged


# --- typed construction -------------------------------------------------------------------------


def _build_section(sname: str, cls: type, values: dict) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(f"unknown config key '{sname}.{key}'{_suggest_key(sname, key, names)}")
        kwargs[key] = _coerce(f"{sname}.{key}", hints[key], value)
    return cls(**kwargs)


def _coerce(key: str, tp: Any, value: Any) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, arg, value)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} is not {_type_name(tp)}")
    if origin is Literal:
        choices = get_args(tp)
        if value in choices and type(value) is type(next(c for c in choices if c == value)):
            return value
        if isinstance(value, str) and value.isdigit() and int(value) in choices:
            return int(value)
        shown = ", ".join(repr(c) for c in choices)
        hint = suggest(str(value), [str(c) for c in choices])
        raise ConfigError(f"{key}: {value!r} is not one of {shown}{hint}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value)
                if f.is_integer():
                    return int(f)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        number = None
        if isinstance(value, (int, float)):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads 3e-4 as a string
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(number):
            # no setting means anything at inf or nan; train.lr=inf surfaced only as a
            # non-finite loss, blamed on the data
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return value
        raise ConfigError(f"{key}: expected a mapping, got {value!r}")
    if tp is list or origin is list:
        if isinstance(value, list):
            return value
        raise ConfigError(f"{key}: expected a list, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover - schema bug


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    if tp is Any:
        return "any"
    return getattr(tp, "__name__", str(tp))


def _absolutise_paths(cfg: Config) -> None:
    for sname, fname in PATH_FIELDS:
        section = getattr(cfg, sname)
        value = getattr(section, fname)
        if isinstance(value, list):  # a list of local files (data.downstream)
            setattr(section, fname, [_absolute(v) for v in value])
        else:
            setattr(section, fname, _absolute(value))


def _absolute(value):
    # a blank path stays blank, for validation to refuse: made absolute it would be the cwd
    if isinstance(value, str) and value.strip() and "://" not in value:
        return str(Path(value).expanduser().absolute())
    return value


# --- suggestions --------------------------------------------------------------------------------


def suggest(word: str, options: list[str]) -> str:
    match = difflib.get_close_matches(word, options, n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _suggest_alias(key: str) -> str:
    """Where another stack's name for a setting lives here, as a hint ('' for none)."""
    alias = alias_of(key)
    if alias is None:
        return ""
    target, _, note = alias.partition(" ")
    return f" (did you mean '{target}'{' ' + note if note else ''}?)"


def _suggest_key(section: str, key: str, names: list[str]) -> str:
    """Another stack's name for a setting, the same key living in another section, or the
    nearest key in the same section."""
    alias = _suggest_alias(key)
    if alias:
        return alias
    elsewhere = [
        f"{s}.{key}"
        for s, cls in SECTIONS.items()
        if s != section and key in {f.name for f in dataclasses.fields(cls)}
    ]
    if elsewhere:
        return f" (did you mean '{elsewhere[0]}'?)"
    match = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    if match:
        return f" (did you mean '{section}.{match[0]}'?)"
    match = difflib.get_close_matches(f"{section}.{key}", all_keys(), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


# --- dict helpers -------------------------------------------------------------------------------


def deep_merge(dst: dict, src: dict) -> None:
    """Merge `src` into `dst` in place; nested mappings merge, everything else replaces."""
    for key, value in src.items():
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            deep_merge(dst[key], value)
        else:
            dst[key] = value


def _deep_copy(d: dict) -> dict:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in d.items()}
