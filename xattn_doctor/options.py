"""Run options and the thresholds config, validated against what each rule declares.

The config is YAML (`--config FILE`) or the `[tool.xattn-doctor]` table of ./pyproject.toml:

    fail_on: warning            # error | warning | never
    disable: [XD202]            # rule codes (or aliases) to skip
    thresholds:
      XD101: {warn_at: 40, error_at: 80}
    blocks:
      include: ["*.cross_attn"] # fnmatch patterns on block names; diagnose only these
      exclude: []
    heads: 16                   # as --heads
    memory_budget_mb: 64        # score tiles and backward pass (default: 64 on CPU,
                                # on CUDA 1024 or an eighth of free memory if less)

An unknown key, rule code or option, or a wrongly typed value, is a ConfigError naming the
file and the key (exit 2).
"""

from __future__ import annotations

import fnmatch
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xattn_doctor.errors import ConfigError
from xattn_doctor.findings import Severity

TOP_KEYS = {"fail_on", "disable", "thresholds", "blocks", "heads", "memory_budget_mb"}
MAX_CONFIG = 4 * 2**20
FAIL_ON = {"error": Severity.ERROR, "warning": Severity.WARNING, "info": Severity.INFO,
           "never": None}


@dataclass(frozen=True)
class Options:
    """Everything that shapes one diagnosis, after CLI flags and config are merged."""

    device: str = "auto"
    dtype: str = "auto"
    heads: int | None = None
    seed: int = 0
    fail_on: Severity | None = Severity.ERROR
    thresholds: dict[str, dict[str, Any]] = field(default_factory=dict)
    disabled: frozenset[str] = frozenset()
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    budget_bytes: int | None = None  # None: the device's default (runtime.default_budget)
    config_path: str | None = None

    def effective_thresholds(self) -> dict[str, dict[str, Any]]:
        """Every enabled rule's options, defaults overlaid with the config."""
        from xattn_doctor.rules import all_rules

        return {r.code: {**r.defaults, **self.thresholds.get(r.code, {})}
                for r in all_rules() if r.code not in self.disabled and r.defaults}

    def wants(self, block: str) -> bool:
        """True when the block passes the include/exclude patterns."""
        if self.include and not any(fnmatch.fnmatchcase(block, p) for p in self.include):
            return False
        return not any(fnmatch.fnmatchcase(block, p) for p in self.exclude)


def parse_fail_on(value: str, where: str | None = None) -> Severity | None:
    """'error' | 'warning' | 'info' | 'never' to a severity (None = never fail)."""
    if value not in FAIL_ON:
        raise ConfigError(where, f"fail_on: {_show(value)} is not one of error, warning, never")
    return FAIL_ON[value]


def load_config(path: Path | None, cwd: Path | None = None) -> tuple[dict[str, Any], str | None]:
    """The raw config mapping and where it came from: --config, else ./pyproject.toml's table."""
    if path is not None:
        return _yaml(path), str(path)
    pyproject = (cwd or Path.cwd()) / "pyproject.toml"
    if pyproject.is_file():
        table = _pyproject_table(pyproject)
        if table is not None:
            return table, f"{pyproject}[tool.xattn-doctor]"
    return {}, None


def build(raw: Mapping[str, Any], where: str | None, **flags: Any) -> Options:
    """Validate `raw` and merge the CLI flags (a flag that is None defers to the config)."""
    unknown = set(raw) - TOP_KEYS
    if unknown:
        raise ConfigError(where, f"unknown key {_show(min(unknown, key=str))} (allowed: "
                                 f"{', '.join(sorted(TOP_KEYS))})")
    disabled = frozenset(_codes(raw.get("disable", []), where))
    thresholds = _thresholds(raw.get("thresholds", {}), where)
    blocks = _mapping(raw.get("blocks", {}), "blocks", where)
    extra = set(blocks) - {"include", "exclude"}
    if extra:
        raise ConfigError(where, f"blocks: unknown key {_show(min(extra, key=str))} "
                                 "(include, exclude)")
    fail_flag = flags.pop("fail_on", None)
    fail_on = parse_fail_on(fail_flag if fail_flag is not None else
                            _typed(raw, "fail_on", str, where, "error"), where)
    heads = flags.pop("heads", None)
    if heads is None:
        heads = _typed(raw, "heads", int, where, None)
    if heads is not None and heads < 1:
        raise ConfigError(where, f"heads: must be a positive integer, not {heads}")
    budget = _typed(raw, "memory_budget_mb", int, where, None)
    if budget is not None and budget < 1:
        raise ConfigError(where, "memory_budget_mb: must be positive")
    return Options(fail_on=fail_on, heads=heads, thresholds=thresholds, disabled=disabled,
                   include=_patterns(blocks, "include", where),
                   exclude=_patterns(blocks, "exclude", where),
                   budget_bytes=budget * 2**20 if budget is not None else None,
                   config_path=where,
                   **{k: v for k, v in flags.items() if v is not None})


def _thresholds(raw: Any, where: str | None) -> dict[str, dict[str, Any]]:
    from xattn_doctor.rules import get

    out: dict[str, dict[str, Any]] = {}
    for code, opts in _mapping(raw, "thresholds", where).items():
        try:
            rule = get(str(code))
        except KeyError:
            raise ConfigError(where, f"thresholds: unknown rule code {_show(code)}") from None
        for name, value in _mapping(opts, f"thresholds.{code}", where).items():
            if name not in rule.options:
                allowed = ", ".join(rule.options) or "none"
                raise ConfigError(where, f"thresholds.{code}: unknown option {_show(name)} "
                                         f"(allowed: {allowed})")
            out.setdefault(rule.code, {})[name] = _coerce(value, rule.options[name],
                                                          f"thresholds.{code}.{name}", where)
    return out


def _coerce(value: Any, kind: type, key: str, where: str | None) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        raise ConfigError(where, f"{key}: expected {kind.__name__}, got {_show(value)}")
    return value


def _codes(raw: Any, where: str | None) -> list[str]:
    from xattn_doctor.rules import canonical

    if not isinstance(raw, list):
        raise ConfigError(where, "disable: expected a list of rule codes")
    out = []
    for code in raw:
        known = canonical(str(code)) if isinstance(code, (str, int)) else None
        if known is None:
            raise ConfigError(where, f"disable: unknown rule code {_show(code)}")
        out.append(known)
    return out


def _patterns(blocks: Mapping[str, Any], key: str, where: str | None) -> tuple[str, ...]:
    value = blocks.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(where, f"blocks.{key}: expected a list of patterns")
    return tuple(value)


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 2, 4, 4, 60, 60


def _show(value: Any) -> str:
    """A short repr for messages: YAML aliases can make a value that is small in the file
    but exponentially large when printed in full."""
    return _REPR.repr(value)


def _mapping(raw: Any, key: str, where: str | None) -> Mapping[str, Any]:
    if not isinstance(raw, Mapping):
        raise ConfigError(where, f"{key}: expected a mapping")
    return raw


def _typed(raw: Mapping[str, Any], key: str, kind: type, where: str | None, default: Any) -> Any:
    if key not in raw:
        return default
    return _coerce(raw[key], kind, key, where)


def _yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(_read_small(path))
    except OSError as e:
        raise ConfigError(path, f"cannot read config: {e.strerror or e}") from e
    except RecursionError as e:
        raise ConfigError(path, "not valid YAML: nested too deeply") from e
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(path, f"not valid YAML: {' '.join(str(e).split())}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(path, "config must be a mapping at the top level")
    return data


def _read_small(path: Path) -> str:
    """The text of a config file: a regular file of at most MAX_CONFIG bytes (a FIFO or a
    device would block or never end)."""
    if not path.is_file():
        raise ConfigError(path, "not a regular file" if path.exists() else "no such file")
    with path.open("rb") as fh:
        raw = fh.read(MAX_CONFIG + 1)
    if len(raw) > MAX_CONFIG:
        raise ConfigError(path, f"larger than {MAX_CONFIG // 2**20} MiB; not a config file")
    return raw.decode("utf-8")


def _pyproject_table(path: Path) -> dict[str, Any] | None:
    import tomllib
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except RecursionError as e:
        raise ConfigError(path, "cannot read pyproject.toml: nested too deeply") from e
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(path, f"cannot read pyproject.toml: {e}") from e
    tool = data.get("tool")
    table = tool.get("xattn-doctor") if isinstance(tool, dict) else None
    if table is None:
        return None
    if not isinstance(table, dict):
        raise ConfigError(path, "[tool.xattn-doctor] must be a table")
    return table
