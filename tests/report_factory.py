"""Hand-built Reports for the format, trend and baseline tests: no torch, no checkpoint."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from xattn_doctor.findings import (
    BlockResult,
    CheckpointInfo,
    Finding,
    Metrics,
    ProbeInfo,
    Remedy,
    Report,
    Severity,
    Symptom,
)

VERSION = "0.1.0"
L3 = "language_model.model.layers.3.cross_attn"
L8 = "language_model.model.layers.8.cross_attn"

CLIP_REMEDY = Remedy(
    summary="Clip gradients and normalise queries and keys.",
    config={"gradient_clipping": {"max_grad_norm": 1.0, "clip_type": "norm"},
            "cross_attention": {"temperature": 1.0}},
    references=("https://arxiv.org/abs/2302.05442",),
    code_change="q = self.q_norm(q)\nk = self.k_norm(k)",
)
DROPOUT_REMEDY = Remedy(summary="Add attention dropout.",
                        config={"cross_attention": {"dropout": 0.1}})
PLAIN_REMEDY = Remedy(summary="Feed real features with --probe.")


def symptom_of(code: str) -> Symptom:
    """The symptom a code's digit names (XD1xx gradient_explosion ... XD6xx architecture)."""
    return list(Symptom)[int(code[2]) - 1]


def block(name: str, *, layout: str = "mllama", heads: int = 32, gated: bool = True,
          **values: Any) -> BlockResult:
    """A block with the given metric values (the rest None)."""
    return BlockResult(name=name, layout=layout, heads=heads, query_dim=4096, context_dim=7680,
                       pre_norm=True, qk_norm=False, gated=gated, metrics=Metrics(**values))


def finding(code: str, severity: Severity, block_name: str | None, message: str,
            evidence: dict[str, Any] | None = None, remedy: Remedy = PLAIN_REMEDY) -> Finding:
    """A finding whose symptom follows its code."""
    return Finding(code=code, symptom=symptom_of(code), severity=severity, block=block_name,
                   message=message, evidence=evidence or {}, remedy=remedy)


def report(path: str = "runs/ckpt-1000/model.safetensors", *,
           blocks: Sequence[BlockResult] = (), findings: Sequence[Finding] = (),
           config: str | None = None, thresholds: dict[str, dict[str, Any]] | None = None,
           skipped: Sequence[dict[str, str]] = ()) -> Report:
    """A report on `path` with the given blocks and findings."""
    info = CheckpointInfo(path=path, tensors=412, bytes=21_474_836, dtype="bfloat16",
                          layout="mllama", config=config)
    probe = ProbeInfo(source="synthetic", path=None,
                      synthesized=["hidden_states", "encoder_hidden_states"])
    return Report(tool_version=VERSION, checkpoint=info, probe=probe, device="cpu",
                  dtype="float32", blocks=list(blocks), findings=list(findings),
                  thresholds=thresholds or {}, skipped=list(skipped))


def sample_blocks() -> list[BlockResult]:
    """Two gated mllama blocks, one unstable, one fine."""
    return [
        block(L3, max_logit=123.4567, entropy_mean=1.23456, entropy_min_head=0.3124,
              max_attention_weight=0.99871, grad_norm=45.678, scale_ratio=12.3456, gate=0.8123),
        block(L8, max_logit=18.25, entropy_mean=3.1, entropy_min_head=2.2,
              max_attention_weight=0.4, grad_norm=1.5, scale_ratio=1.05, gate=-0.985),
    ]


def sample_findings() -> list[Finding]:
    """Findings of every severity, on blocks and on the checkpoint."""
    return [
        finding("XD101", Severity.ERROR, L3, "max logit 123.5 exceeds 100",
                {"max_logit": 123.4567, "threshold": 100.0, "head": 7}, CLIP_REMEDY),
        finding("XD201", Severity.WARNING, L3, "head 7 entropy 0.3124 nats is below 0.5",
                {"entropy_min_head": 0.3124, "head_entropy": [2.1, 0.3124]}, DROPOUT_REMEDY),
        finding("XD402", Severity.WARNING, L8, "gate -0.985 is near saturation",
                {"gate": -0.985}),
        finding("XD301", Severity.INFO, L8, "scale ratio unchecked on synthetic features"),
        finding("XD601", Severity.INFO, None, "no block uses qk-norm"),
    ]


def sample_report(path: str = "runs/ckpt-1000/model.safetensors",
                  config: str | None = "runs/ckpt-1000/config.json") -> Report:
    """A realistic unhealthy report: two blocks, five findings of all severities."""
    return report(path, blocks=sample_blocks(), findings=sample_findings(), config=config)


def healthy_report(path: str = "runs/ckpt-2000/model.safetensors") -> Report:
    """Two fine blocks, no findings."""
    return report(path, blocks=[block(L3, max_logit=12.0, gate=0.1),
                                block(L8, max_logit=9.5, gate=0.2)])


def series(metric: str, values: Sequence[float | None], *, name: str = L3,
           paths: Sequence[str] | None = None,
           thresholds: dict[str, dict[str, Any]] | None = None) -> list[Report]:
    """Consecutive reports in which block `name` has `metric` = each of `values`."""
    paths = paths or [f"runs/ckpt-{1000 * (i + 1)}/model.safetensors" for i in range(len(values))]
    out = []
    for path, value in zip(paths, values):
        watched = block(name)
        setattr(watched.metrics, metric, value)
        blocks = [watched, block(L8, max_logit=10.0, gate=0.1)]
        out.append(report(path, blocks=blocks, thresholds=thresholds))
    return out
