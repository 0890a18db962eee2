"""The structural fixes suggest-config can recommend, and which findings call for them.

Torch-free: `suggest` reads this to write `code_changes`, and `simulate` to know what to try
on which block and how to judge the result. Each finding code has a plan: the metric that
judges a fix and the fixes to try, in order. Every simulated fix that any finding on a block
calls for is tried on that block and judged against each of the block's findings; the fix that
clears the most of them is recommended first (a key norm that also cures the logit growth the
unnormalised context caused beats a qk-norm for the logits alone); ties go to the fix nearer
the cause, in the order of `FIXES` (inputs and parameters first, bounds on the logits after).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

ACTIONABLE = ("warning", "error")  # info findings never change the suggestion


@dataclass(frozen=True)
class Fix:
    """A change to the model code: its config key, its snippet, whether it can be simulated."""

    name: str
    label: str  # as in "simulated with <label>"
    summary: str
    key: tuple[str, ...]
    value: Any
    snippet: str  # str.format fields: heads, head_dim, query_dim, context_dim
    simulated: bool = True


FIXES: dict[str, Fix] = {f.name: f for f in (
    Fix("temperature_floor", "the temperature floor raised to 0.5", "Raise the learnable "
        "temperature's clamp floor from 0.1 to 0.5 (or freeze the temperature at 1.0).",
        ("cross_attention", "temperature_min"), 0.5,
        "logits = logits / self.temperature.clamp(min=0.5)  # was clamp(min=0.1)"),
    Fix("key_norm", "a key norm", "Add a LayerNorm on the context stream (the key norm) before "
        "the key and value projections, beside the query norm.",
        ("cross_attention", "key_norm"), True,
        "self.key_norm = nn.LayerNorm({context_dim})\n"
        "context = self.key_norm(encoder_hidden_states)  # feeds k_proj and v_proj"),
    Fix("reinit_out_proj", "the output projection re-initialised (Xavier, gate kept at 0)",
        "Re-initialise the output projection (Xavier uniform) and keep only the gate at zero, "
        "as Flamingo does: a zero gate with a zero projection never gets a gradient.",
        ("cross_attention", "init_method"), "xavier",
        "nn.init.xavier_uniform_(self.cross_attn.out_proj.weight)\n"
        "nn.init.zeros_(self.cross_attn.out_proj.bias)\n"
        "nn.init.zeros_(self.gate)  # the gate only: tanh(0) = 0 starts the block as identity"),
    Fix("qk_norm", "qk-norm", "Add qk-norm: a per-head RMSNorm (unit gain at init) on q and k, "
        "after the projections; it bounds every logit by sqrt(head_dim) times the gains.",
        ("cross_attention", "qk_norm"), True,
        "self.q_norm = nn.RMSNorm({head_dim})  # per head, after q_proj\n"
        "self.k_norm = nn.RMSNorm({head_dim})  # per head, after k_proj\n"
        "q = self.q_norm(q.view(B, Lq, {heads}, {head_dim}))\n"
        "k = self.k_norm(k.view(B, Lk, {heads}, {head_dim}))"),
    Fix("softcap", "a logit soft-cap of 50", "Soft-cap the attention logits at 50 "
        "(cap * tanh(logits / cap), as Gemma 2) before the softmax.",
        ("cross_attention", "logit_softcap"), 50.0,
        "logits = 50.0 * torch.tanh(logits / 50.0)  # before the softmax"),
    Fix("pre_ln", "pre-LN", "Move the LayerNorm before the cross-attention (pre-LN) instead of "
        "after the residual add (post-LN).",
        ("cross_attention", "pre_norm"), True,
        "# before: x = self.norm(x + self.cross_attn(x, c))\n"
        "x = x + self.cross_attn(self.norm(x), c)", simulated=False),
    Fix("tanh_gate", "a tanh gate", "Add a Flamingo tanh gate initialised at 0 on the "
        "cross-attention output: the block starts as the identity and |gate| <= 1.",
        ("cross_attention", "use_gating"), True,
        "self.gate = nn.Parameter(torch.zeros(1))  # zero-init the gate only\n"
        "x = x + torch.tanh(self.gate) * self.cross_attn(self.norm(x), c)", simulated=False),
)}

RANK = {name: i for i, name in enumerate(FIXES)}

NOT_SIMULATED = {
    "pre_ln": "moving the norm changes what the trained weights see; judge it by training",
    "tanh_gate": "a gate at 0 silences the block by design; judge it by training",
}


@dataclass(frozen=True)
class Plan:
    """What a finding code calls for: the metric that judges a fix, and the fixes in order."""

    metric: str | None
    fixes: tuple[str, ...]


PLANS: dict[str, Plan] = {
    "XD101": Plan("max_logit", ("qk_norm", "softcap")),
    "XD103": Plan("max_logit", ("temperature_floor", "qk_norm")),
    "XD201": Plan("entropy_mean", ("qk_norm", "softcap")),
    "XD202": Plan("saturated_query_share", ("qk_norm", "softcap")),
    "XD301": Plan("scale_ratio", ("key_norm",)),
    "XD401": Plan("grad_norm", ("reinit_out_proj",)),
    "XD601": Plan(None, ("pre_ln",)),
    "XD102": Plan("grad_norm", ("tanh_gate",)),
}


@dataclass(frozen=True)
class Trial:
    """One fix to try on one block for one finding."""

    code: str
    block: str
    fix: str
    metric: str | None


def applies(fix: str, block: Mapping[str, Any]) -> bool:
    """Whether `fix` changes anything on a block (a report's block object)."""
    metrics = block.get("metrics") or {}
    return {
        "qk_norm": not block.get("qk_norm", False),
        "softcap": True,
        "temperature_floor": metrics.get("temperature") is not None,
        "key_norm": not block.get("key_norm", False),
        "reinit_out_proj": True,
        "pre_ln": bool(block.get("post_norm", False)) and not block.get("pre_norm", False),
        "tanh_gate": not block.get("gated", False),
    }[fix]


def sick_blocks(report: Mapping[str, Any]) -> dict[str, dict[str, list[Trial]]]:
    """block -> finding code -> the applicable fixes of its plan, in plan order (maybe none),
    for every warning or error finding that has a plan."""
    blocks = {b["name"]: b for b in report.get("blocks", [])}
    out: dict[str, dict[str, list[Trial]]] = {}
    for f in report.get("findings", []):
        plan, name = PLANS.get(f["code"]), f.get("block")
        if plan is None or f["severity"] not in ACTIONABLE or name not in blocks:
            continue
        codes = out.setdefault(name, {})
        if f["code"] not in codes:
            codes[f["code"]] = [Trial(f["code"], name, fix, plan.metric) for fix in plan.fixes
                                if applies(fix, blocks[name])]
    return out


def to_simulate(codes: Mapping[str, list[Trial]]) -> list[str]:
    """The simulated fixes any of a block's findings call for, in order of first mention."""
    return list(dict.fromkeys(t.fix for ts in codes.values() for t in ts
                              if FIXES[t.fix].simulated and t.metric))


def judge(code: str, after: float, thresholds: Mapping[str, Mapping[str, Any]],
          block: Mapping[str, Any]) -> tuple[bool, str]:
    """Whether a simulated metric clears the rule's threshold, and the threshold as text."""
    t = thresholds.get(code, {})
    ok = math.isfinite(after)
    if code in ("XD101", "XD103"):
        limit = float(thresholds.get("XD101", {}).get("warn_at", 50.0))
        return ok and after < limit, f"< {limit:g}"
    if code == "XD201":
        from xattn_doctor.rules.xd201_entropy_collapse import threshold

        opts = {"nats": 0.5, "fraction": 0.25, **t}
        limit = threshold(opts, (block.get("metrics") or {}).get("valid_keys_mean"))
        return ok and after >= limit, f">= {limit:.4g}"
    if code == "XD202":
        limit = float(t.get("share", 0.5))
        return ok and after < limit, f"< {limit:g}"
    if code == "XD301":
        low, high = float(t.get("low", 0.1)), float(t.get("high", 10.0))
        return ok and low <= after <= high, f"in [{low:g}, {high:g}]"
    if code == "XD401":
        return ok and after > 0, "> 0"
    if code == "XD102":
        limit = float(t.get("warn_at", 10.0))
        return ok and after < limit, f"< {limit:g}"
    return ok, "-"


def snippet(fix: Fix, block: Mapping[str, Any]) -> str:
    """The fix's code snippet with the block's widths filled in."""
    heads = block.get("heads") or 1
    head_dim = block.get("head_dim") or (block.get("query_dim", 0) // heads)
    return fix.snippet.format(heads=heads, head_dim=head_dim,
                              query_dim=block.get("query_dim"),
                              context_dim=block.get("context_dim"))
