"""The rule interface. A rule is one class in one file, registered where it is defined.

Its metadata are class attributes; its docstring is the `explain` text, with the sections
Why / Fix / References. `rules`, `explain`, SARIF rule descriptions and Markdown all read
this one object. Rules see plain numbers only (no torch), so they are cheap to import.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from xattn_doctor.findings import BlockResult, Finding, Remedy, Severity, Symptom
from xattn_doctor.layouts._base import BlockSpec


@dataclass(frozen=True)
class BlockContext:
    """What a rule may look at for one block."""

    block: BlockResult
    spec: BlockSpec
    probe_source: str  # "file" | "synthetic" | "model"
    dtype: str  # the dtype the probe ran in
    checkpoint_dtype: str = "float32"  # the dtype the weights were saved in

    @property
    def synthetic(self) -> bool:
        """True when the block ran on stand-in inputs (not a probe file's or a live model's
        real features)."""
        return self.probe_source not in ("file", "model") or self.block.inputs not in (
            "probe", "model")


class Rule:
    """Base class of every rule. Subclasses set the class attributes and `check`."""

    code: ClassVar[str]
    slug: ClassVar[str]
    symptom: ClassVar[Symptom]
    severity: ClassVar[Severity]  # the worst severity this rule can give
    summary: ClassVar[str]
    options: ClassVar[dict[str, type]] = {}
    defaults: ClassVar[dict[str, Any]] = {}
    option_help: ClassVar[dict[str, str]] = {}
    references: ClassVar[tuple[str, ...]] = ()
    aliases: ClassVar[tuple[str, ...]] = ()
    remedy: ClassVar[Remedy]
    fails_build: ClassVar[bool] = True  # False: informs only, never above info
    series: ClassVar[bool] = False  # True: judged over checkpoints by `trend`, not per block

    def check(self, ctx: BlockContext, opts: Mapping[str, Any]) -> list[Finding]:
        """The findings of this rule on one block (empty when it does not apply)."""
        raise NotImplementedError

    @classmethod
    def explain(cls) -> str:
        """The rule's docstring, dedented: the text of `xattn-doctor explain`."""
        return inspect.cleandoc(cls.__doc__ or cls.summary)

    @classmethod
    def threshold_text(cls) -> str:
        """The default thresholds as `name=value` pairs (for `xattn-doctor rules`)."""
        return ", ".join(f"{k}={v}" for k, v in cls.defaults.items()) or "-"

    def finding(self, ctx: BlockContext, severity: Severity, message: str,
                evidence: dict[str, Any], remedy: Remedy | None = None) -> Finding:
        """A finding of this rule on `ctx`'s block."""
        return Finding(code=self.code, symptom=self.symptom, severity=severity,
                       block=ctx.block.name, message=message, evidence=evidence,
                       remedy=remedy or self.remedy)


def fmt(value: float | None, digits: int = 4) -> str:
    """A number in messages: 4 significant digits, or 'n/a'."""
    if value is None:
        return "n/a"
    return f"{value:.{digits}g}"
