"""The report's data model: severities, symptoms, findings, per-block metrics, reports.

Everything here is plain Python (no torch) so that renderers, `rules` and `explain`
stay fast to import. `Report.to_json()` is the contract's JSON (schema_version 1).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from enum import Enum, StrEnum
from typing import Any

SCHEMA_VERSION = 1
SATURATED_WEIGHT = 0.99  # a query whose largest attention weight exceeds this is saturated


class Severity(StrEnum):
    """How bad a finding is; ordered info < warning < error."""

    INFO = "info"
    WARNING = "warning"
    ERROR = "error"

    @property
    def rank(self) -> int:
        """0 for info, 1 for warning, 2 for error."""
        return _SEVERITY_RANK[self]

    def __str__(self) -> str:
        return self.value


_SEVERITY_RANK = {Severity.INFO: 0, Severity.WARNING: 1, Severity.ERROR: 2}


class Symptom(StrEnum):
    """The contract's symptom families; each owns one digit of the rule codes."""

    GRADIENT_EXPLOSION = "gradient_explosion"
    ATTENTION_COLLAPSE = "attention_collapse"
    FEATURE_SCALE_MISMATCH = "feature_scale_mismatch"
    GATING = "gating"
    NUMERICS = "numerics"
    ARCHITECTURE = "architecture"
    VANISHING_GRADIENTS = "vanishing_gradients"  # code group 7: seen only across a live model

    @property
    def digit(self) -> int:
        """The digit that follows `XD` in the codes of this symptom's rules."""
        return list(Symptom).index(self) + 1

    @property
    def heading(self) -> str:
        """Human heading, e.g. 'Gradient explosion'."""
        return self.value.replace("_", " ").capitalize()

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Remedy:
    """What to do about a finding: a summary, config keys, an optional code change, references."""

    summary: str
    config: dict[str, Any] = field(default_factory=dict)
    references: tuple[str, ...] = ()
    code_change: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The contract's `remedy` object (plus `code_change` when there is one)."""
        out: dict[str, Any] = {
            "summary": self.summary,
            "config": _clean(self.config),
            "references": list(self.references),
        }
        if self.code_change:
            out["code_change"] = self.code_change
        return out


@dataclass(frozen=True)
class Finding:
    """One diagnosed symptom on one block (or on the checkpoint when `block` is None)."""

    code: str
    symptom: Symptom
    severity: Severity
    block: str | None
    message: str
    evidence: dict[str, Any]
    remedy: Remedy

    def to_json(self) -> dict[str, Any]:
        """The contract's finding object."""
        return {
            "code": self.code,
            "symptom": self.symptom.value,
            "severity": self.severity.value,
            "block": self.block,
            "message": self.message,
            "evidence": _clean(self.evidence),
            "remedy": self.remedy.to_json(),
        }


@dataclass
class Metrics:
    """What was measured on one block. The first seven fields are the contract's `metrics`."""

    max_logit: float | None = None
    entropy_mean: float | None = None
    entropy_min_head: float | None = None
    max_attention_weight: float | None = None
    grad_norm: float | None = None
    scale_ratio: float | None = None
    gate: float | None = None
    # extensions (the contract allows adding keys)
    entropy_norm_mean: float | None = None
    entropy_norm_min_head: float | None = None
    head_entropy: list[float] = field(default_factory=list)
    head_entropy_norm: list[float] = field(default_factory=list)
    saturated_query_share: float | None = None
    top_key_share: float | None = None
    top_key_share_max_head: float | None = None
    top_key_index: int | None = None
    valid_keys_mean: float | None = None
    scale_ratio_raw: float | None = None
    query_rms: float | None = None
    context_rms: float | None = None
    grad_norms: dict[str, float] = field(default_factory=dict)
    input_grad_norms: dict[str, float] = field(default_factory=dict)
    zero_grad: bool | None = None
    nonfinite: dict[str, int] = field(default_factory=dict)
    spectral_max_logit: float | None = None
    spectral_bound_source: str | None = None
    gate_abs_max: float | None = None
    weight_norms: dict[str, float] = field(default_factory=dict)
    temperature: float | None = None
    output_rms: float | None = None
    max_abs_activation: float | None = None
    backward_queries: int | None = None
    # model mode and the monitor: the gradients the model's own loss sent into the block
    real_grad_norm: float | None = None
    real_grad_norms: dict[str, float] | None = None

    def to_json(self) -> dict[str, Any]:
        """All metrics as JSON-safe values (non-finite floats become strings)."""
        out: dict[str, Any] = _clean(asdict(self))
        return out


@dataclass
class BlockResult:
    """One recognised block: its geometry and what was measured on it."""

    name: str
    layout: str
    heads: int
    query_dim: int
    context_dim: int
    pre_norm: bool
    qk_norm: bool
    gated: bool
    metrics: Metrics
    kv_heads: int | None = None
    head_dim: int | None = None
    post_norm: bool = False
    key_norm: bool = False
    heads_source: str = "weights"
    inputs: str = "probe"

    def to_json(self) -> dict[str, Any]:
        """The contract's block object, with a few extra descriptive keys."""
        return {
            "name": self.name,
            "layout": self.layout,
            "heads": self.heads,
            "query_dim": self.query_dim,
            "context_dim": self.context_dim,
            "pre_norm": self.pre_norm,
            "qk_norm": self.qk_norm,
            "gated": self.gated,
            "metrics": self.metrics.to_json(),
            "kv_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "post_norm": self.post_norm,
            "key_norm": self.key_norm,
            "heads_source": self.heads_source,
            "inputs": self.inputs,
        }


@dataclass
class CheckpointInfo:
    """What was read: the path, tensor count, bytes on disk, dtype and layout."""

    path: str
    tensors: int
    bytes: int
    dtype: str
    layout: str
    config: str | None = None  # path of the config.json read beside it, if any


@dataclass
class ProbeInfo:
    """Where the probe inputs came from, and what was synthesised."""

    source: str  # "file" | "synthetic" | "model" (model mode: the batch a live model ran on)
    path: str | None
    synthesized: list[str] = field(default_factory=list)


@dataclass
class Report:
    """The diagnosis of one checkpoint."""

    tool_version: str
    checkpoint: CheckpointInfo
    probe: ProbeInfo
    device: str
    dtype: str
    blocks: list[BlockResult]
    findings: list[Finding]
    thresholds: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)
    mode: str = "blocks"  # "blocks" (each block alone on a probe) | "model" (the live model ran)
    loss: float | None = None  # model mode: the model's own loss on the batch, or the proxy
    loss_source: str | None = None  # "model" | "proxy" | None (blocks mode)
    global_grad_norm: float | None = None  # model mode: the whole model's pre-clip grad norm
    loss_finite: bool | None = None  # model mode: whether the loss was a finite number
    cross_attention_grad_norm: float | None = None  # model mode: the blocks' joint grad norm
    # model mode: the blocks' share of the squared global grad norm (additive over parameters)
    cross_attention_grad_share: float | None = None
    notes: list[str] = field(default_factory=list)  # model mode: how it ran (loading, loss)

    def counts(self) -> dict[Severity, int]:
        """Number of findings of each severity."""
        out = {s: 0 for s in Severity}
        for f in self.findings:
            out[f.severity] += 1
        return out

    @property
    def status(self) -> str:
        """'error', 'warning' or 'healthy', from the worst finding."""
        c = self.counts()
        if c[Severity.ERROR]:
            return "error"
        if c[Severity.WARNING]:
            return "warning"
        return "healthy"

    def to_json(self) -> dict[str, Any]:
        """The contract's JSON report object."""
        c = self.counts()
        return {
            "schema_version": SCHEMA_VERSION,
            "tool": {"name": "xattn-doctor", "version": self.tool_version},
            "checkpoint": asdict(self.checkpoint),
            "probe": {
                "source": self.probe.source,
                "path": self.probe.path,
                "synthesized": list(self.probe.synthesized),
            },
            "device": self.device,
            "dtype": self.dtype,
            "mode": self.mode,
            "loss": _clean(self.loss),
            "loss_source": self.loss_source,
            "global_grad_norm": _clean(self.global_grad_norm),
            "loss_finite": self.loss_finite,
            "cross_attention_grad_norm": _clean(self.cross_attention_grad_norm),
            "cross_attention_grad_share": _clean(self.cross_attention_grad_share),
            "notes": list(self.notes),
            "blocks": [b.to_json() for b in self.blocks],
            "skipped_blocks": list(self.skipped),
            "findings": [f.to_json() for f in self.findings],
            "thresholds": _clean(self.thresholds),
            "summary": {
                "errors": c[Severity.ERROR],
                "warnings": c[Severity.WARNING],
                "infos": c[Severity.INFO],
                "status": self.status,
            },
        }


def _clean(value: Any) -> Any:
    """Make a value JSON-safe: tuples to lists, NaN/Inf to strings, round nothing."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value
