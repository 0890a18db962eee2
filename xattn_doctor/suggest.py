"""suggest-config: the training config to run next, from a diagnosis. Torch-free.

Three layers, each recorded: the baseline RECIPE (the seed playbook's Best Practices Summary,
with its gate/projection init corrected and extended with keys the findings need); the recipe
fitted to the inputs (`--total-steps`, the checkpoint's blocks, widths, heads and dtype); and
the changes the warning and error findings call for, each with a comment naming its code and
evidence. Info findings change nothing. Every key is documented in docs/suggest-config.md.
"""

from __future__ import annotations

import copy
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from xattn_doctor.findings import _clean
from xattn_doctor.yaml_emit import Path, emit

WARMUP_RATIO = 0.1  # the playbook: "warmup_steps = int(0.1 * total_training_steps)"
PLAYBOOK_WARMUP = 5000

_RECIPE: dict[str, Any] = {
    "optimizer": {"type": "AdamW", "lr": 1.0e-4, "weight_decay": 0.05, "betas": [0.9, 0.98]},
    "lr_schedule": {"schedule": "cosine", "warmup_ratio": WARMUP_RATIO,
                    "warmup_steps": PLAYBOOK_WARMUP, "total_steps": None,
                    "layer_wise_warmup": False},
    "gradient_clipping": {"max_grad_norm": 1.0, "clip_type": "norm",
                          "cross_attention_max_grad_norm": None, "cross_attention_params": []},
    "cross_attention": {
        "num_layers": None, "num_heads": 12, "query_dim": None, "context_dim": None,
        "pre_norm": True, "key_norm": True, "qk_norm": False, "logit_softcap": None,
        "dropout": 0.1, "dropout_warmup": {"enabled": False, "start": 0.3, "end": 0.1},
        "use_gating": True, "gate_init": 0.0, "init_method": "xavier",
        "gate_lr_multiplier": 1.0, "temperature": 1.0, "learnable_temperature": True,
        "temperature_min": 0.1,
    },
    "regularization": {"attention_entropy": {"weight": 0.0, "target": 2.0}},
    "mixed_precision": {"dtype": "bfloat16", "loss_scaling": "none"},
    "monitoring": {"log_attention_every": 100, "log_gradients_every": 100, "check_nan_every": 10,
                   "alerts": {"max_logit": 50.0, "entropy_below": 0.5, "grad_norm_above": 100.0,
                              "attention_weight_above": 0.99, "scale_ratio_outside": [0.1, 10.0]}},
}

RECIPE_COMMENTS: dict[Path, str] = {
    ("lr_schedule", "warmup_steps"): "the playbook's 5000 (10% of its run); pass --total-steps "
                                     "for 10% of yours",
    ("cross_attention", "use_gating"): "Flamingo-style tanh gate",
    ("cross_attention", "gate_init"): "zero-init the gate ONLY (Flamingo): the block starts as "
                                      "the identity and still gets gradient through the gate",
    ("cross_attention", "init_method"): "output projection init, NOT \"zero\": the playbook's "
                                        "init_method zero with a zero gate leaves every "
                                        "parameter of the block with zero gradient (XD401)",
    ("cross_attention", "temperature"): "learnable temperature, clamped at temperature_min",
}

# (config key, threshold rule code, option) for monitoring.alerts taken from the report
_ALERTS = ((("max_logit",), "XD101", "warn_at"), (("entropy_below",), "XD201", "nats"),
           (("grad_norm_above",), "XD102", "error_at"))


def recipe() -> dict[str, Any]:
    """A fresh copy of the baseline recipe (before it is fitted to a checkpoint)."""
    return copy.deepcopy(_RECIPE)


@dataclass
class Draft:
    """The config being built: data, end-of-line comments, and the record of changes."""

    data: dict[str, Any] = field(default_factory=recipe)
    comments: dict[Path, dict[str, str]] = field(default_factory=dict)
    changes: list[dict[str, Any]] = field(default_factory=list)

    def get(self, path: Path) -> Any:
        """The value at a key path."""
        node: Any = self.data
        for k in path:
            node = node[k]
        return node

    def set(self, path: Path, value: Any, why: str, code: str | None = None) -> None:
        """Set a value with the reason; a change of value is recorded, the reason always kept."""
        parent = self.data
        for k in path[:-1]:
            parent = parent.setdefault(k, {})
        was = parent.get(path[-1])
        parent[path[-1]] = value
        if was != value:
            self.changes.append({"key": ".".join(path), "value": value, "was": was,
                                 "code": code, "why": why})
        self.note(path, why, code)

    def note(self, path: Path, why: str, code: str | None = None) -> None:
        """Comment on a key without changing it; a later reason for the same code replaces
        the earlier one (so a simulated fix's account supersedes the bare evidence)."""
        self.comments.setdefault(path, {})[code or why] = why

    def flat_comments(self) -> dict[Path, str]:
        """One comment line per key: the recipe's own, or the reasons joined by '; '."""
        out = dict(RECIPE_COMMENTS)
        for path, notes in self.comments.items():
            out[path] = "; ".join(notes.values())
        return out


def fit(draft: Draft, report: Mapping[str, Any], total_steps: int | None) -> None:
    """Fit the recipe to the run length, the checkpoint's blocks and dtype, the thresholds."""
    if total_steps is not None:
        warm = max(1, round(WARMUP_RATIO * total_steps))
        draft.set(("lr_schedule", "total_steps"), total_steps, "--total-steps")
        draft.set(("lr_schedule", "warmup_steps"), warm,
                  f"10% of --total-steps {total_steps} (the playbook's warmup share)")
    _fit_geometry(draft, report.get("blocks", []))
    dtype = str(report.get("checkpoint", {}).get("dtype", ""))
    if dtype == "float16":
        draft.note(("mixed_precision", "dtype"), "the checkpoint is float16: bf16 has fp32's "
                   "exponent range, so logits and gradients cannot overflow at 65504")
        draft.set(("mixed_precision", "loss_scaling"), "dynamic", "the checkpoint is float16: "
                  "where you must stay in fp16, use dynamic loss scaling (Micikevicius et al.)")
    _fit_alerts(draft, report.get("thresholds", {}))


def _fit_geometry(draft: Draft, blocks: Sequence[Mapping[str, Any]]) -> None:
    if not blocks:
        return
    n = len(blocks)
    names = _names(b["name"] for b in blocks)
    draft.set(("cross_attention", "num_layers"), n, f"from the checkpoint: {n} cross-attention "
              f"block(s) ({names})")
    for key in ("num_heads", "query_dim", "context_dim"):
        field_ = "heads" if key == "num_heads" else key
        values: list[int] = sorted({int(b[field_]) for b in blocks
                                    if isinstance(b.get(field_), int)})
        if not values:
            continue
        why = "from the checkpoint" + ("" if len(values) == 1 else " (differs between blocks)")
        if key == "num_heads" and any(b.get("heads_source") == "default" for b in blocks):
            why += "; assumed, not read (XD602): pass --heads or ship config.json"
        draft.set(("cross_attention", key), values[0] if len(values) == 1 else values, why)


def _fit_alerts(draft: Draft, thresholds: Mapping[str, Mapping[str, Any]]) -> None:
    for key, code, option in _ALERTS:
        value = thresholds.get(code, {}).get(option)
        path = ("monitoring", "alerts") + key
        if isinstance(value, (int, float)) and float(value) != draft.get(path):
            draft.set(path, float(value), f"from the report's thresholds ({code}.{option})")
    low, high = (thresholds.get("XD301", {}).get(k) for k in ("low", "high"))
    if isinstance(low, (int, float)) and isinstance(high, (int, float)):
        pair = [float(low), float(high)]
        if pair != draft.get(("monitoring", "alerts", "scale_ratio_outside")):
            draft.set(("monitoring", "alerts", "scale_ratio_outside"), pair,
                      "from the report's thresholds (XD301.low, XD301.high)")


def _names(names: Iterable[str], at_most: int = 3) -> str:
    names = list(names)
    shown = ", ".join(n or "<root>" for n in names[:at_most])
    return shown + (f" and {len(names) - at_most} more" if len(names) > at_most else "")


@dataclass
class Suggestion:
    """The finished suggestion: the data (YAML and JSON alike) and the YAML comments."""

    data: dict[str, Any]
    comments: dict[Path, str]
    header: list[str]

    def render(self, fmt: str) -> str:
        """`yaml` (with comments) or `json` (the same data, no comments)."""
        if fmt == "json":
            import json

            return json.dumps(self.data, indent=2) + "\n"
        header = [w for line in self.header for w in textwrap.wrap(line, 96)]
        return emit(self.data, self.comments, header)


def build(report: Mapping[str, Any], simulations: Sequence[Mapping[str, Any]] | None,
          total_steps: int | None = None, notes: Sequence[str] = ()) -> Suggestion:
    """The suggestion for one report; `simulations` None means none could be run."""
    from xattn_doctor.suggest_findings import apply_findings

    draft = Draft()
    fit(draft, report, total_steps)
    acted, code_changes = apply_findings(draft, report, simulations)
    sims = list(simulations or [])
    all_notes = list(notes)
    if simulations is None:
        all_notes.append("no simulation was run: a report alone has no weights to rebuild the "
                         "blocks with; pass the checkpoint to try each fix before trusting it")
    data = dict(draft.data)
    data["code_changes"] = code_changes
    data["simulations"] = sims
    data["changes"] = draft.changes
    data["diagnosis"] = _diagnosis(report, acted, all_notes)
    return Suggestion(_clean(data), draft.flat_comments(), _header(report, acted, sims,
                                                                   simulations is None))


def _diagnosis(report: Mapping[str, Any], acted: Sequence[str],
               notes: Sequence[str]) -> dict[str, Any]:
    ckpt = report.get("checkpoint", {})
    summary = report.get("summary", {})
    return {"checkpoint": ckpt.get("path"), "dtype": ckpt.get("dtype"),
            "layout": ckpt.get("layout"), "status": summary.get("status"),
            "findings": {k: summary.get(k, 0) for k in ("errors", "warnings", "infos")},
            "acted_on": list(acted), "notes": list(notes)}


def _header(report: Mapping[str, Any], acted: Sequence[str], sims: Sequence[Mapping[str, Any]],
            no_sims: bool) -> list[str]:
    path = report.get("checkpoint", {}).get("path", "?")
    lines = [f"xattn-doctor suggest-config for {path}",
             "Keys, meanings, defaults and sources: docs/suggest-config.md"]
    if not acted:
        lines.append("Nothing needed changing: no warning or error finding. This is the baseline "
                     "recipe (the seed playbook's, with only the gate zero-initialised), fitted to "
                     "the checkpoint.")
        return lines
    lines.append("Changed from the baseline recipe for " + ", ".join(acted) + "; each changed "
                 "value names its finding and the evidence.")
    if no_sims:
        lines.append("No simulation was run (a report alone has no weights): the code changes "
                     "are untested on this checkpoint.")
    elif sims:
        ok = sum(1 for s in sims if s.get("resolved"))
        lines.append(f"Simulated before recommending: {ok} of {len(sims)} fix trial(s) brought "
                     "the metric past its threshold (see simulations).")
    return lines
