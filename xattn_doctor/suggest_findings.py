"""What each warning or error finding changes in the suggested config, with its evidence.

Config-only adjustments are a table (`ADJUST`); structural fixes come from `fixes.PLANS` and
are chosen by simulation where one ran: the first fix in plan order that brought the metric
past its threshold. A rule with neither (a future rule) contributes its own `remedy.config`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from xattn_doctor.fixes import (
    ACTIONABLE,
    FIXES,
    NOT_SIMULATED,
    PLANS,
    RANK,
    Trial,
    sick_blocks,
    snippet,
)
from xattn_doctor.suggest import Draft
from xattn_doctor.yaml_emit import Path

DEEP = 4  # cross-attention blocks from which layer-wise warmup is suggested
CLIP = ("gradient_clipping", "cross_attention_max_grad_norm")
ENTROPY = ("regularization", "attention_entropy", "weight")
DROPOUT_WARMUP = ("cross_attention", "dropout_warmup", "enabled")

ADJUST: dict[str, tuple[tuple[Path, Any], ...]] = {
    "XD101": ((CLIP, 0.5),),
    "XD102": ((CLIP, 0.5),),
    "XD103": (),
    "XD201": ((ENTROPY, 0.01), (DROPOUT_WARMUP, True)),
    "XD202": ((DROPOUT_WARMUP, True),),
    "XD203": ((ENTROPY, 0.01), (DROPOUT_WARMUP, True)),
    "XD301": ((("cross_attention", "key_norm"), True),),
    "XD401": ((("cross_attention", "gate_init"), 0.0),
              (("cross_attention", "init_method"), "xavier")),
    "XD402": ((("cross_attention", "gate_lr_multiplier"), 0.1),),
    "XD501": ((("monitoring", "check_nan_every"), 1),),
    "XD601": ((("cross_attention", "pre_norm"), True),),
}
LAYER_WISE = ("XD101", "XD102", "XD601")


def _n(value: Any, digits: int = 4) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:.{digits}g}"
    return str(value)


def _pct(value: Any) -> str:
    return f"{100 * value:.3g}%" if isinstance(value, (int, float)) else str(value)


EVIDENCE: dict[str, tuple[str, Callable[[Mapping[str, Any]], float]]] = {
    "XD101": ("max logit {max_logit}", lambda e: _num(e.get("max_logit"))),
    "XD102": ("gradient norm {grad_norm}", lambda e: _num(e.get("grad_norm"))),
    "XD103": ("temperature {temperature} at its floor {floor}", lambda e: 0.0),
    "XD201": ("mean entropy {entropy_mean} nats (< {threshold_nats})",
              lambda e: -_num(e.get("entropy_mean"))),
    "XD202": ("{saturated_query_share%} of queries put > 0.99 on one key",
              lambda e: _num(e.get("saturated_query_share"))),
    "XD203": ("key {top_key_index} tops {top_key_share%} of queries, low entropy",
              lambda e: _num(e.get("top_key_share"))),
    "XD301": ("context/query RMS ratio {scale_ratio}",
              lambda e: abs(math.log(max(_num(e.get("scale_ratio")), 1e-30)))),
    "XD401": ("every attention-path gradient is 0", lambda e: 0.0),
    "XD402": ("gate {gate} saturated", lambda e: _num(e.get("gate_abs_max"))),
    "XD501": ("NaN/Inf values", lambda e: 0.0),
    "XD601": ("post-LN block", lambda e: 0.0),
}


def _num(value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return -math.inf
    return out if not math.isnan(out) else -math.inf


def evidence(code: str, findings: Sequence[Mapping[str, Any]]) -> str:
    """`CODE: <evidence of the worst block> in <block> (+N more blocks)`."""
    template, score = EVIDENCE.get(code, ("", lambda e: 0.0))
    worst = max(findings, key=lambda f: (f["severity"] == "error", score(f.get("evidence", {}))))
    ev = worst.get("evidence", {})
    text = _fill(template, ev) if template else worst.get("message", "")
    where = f" in {worst['block']}" if worst.get("block") else ""
    more = len({f.get("block") for f in findings}) - 1
    return f"{code}: {text}{where}" + (f" (+{more} more block(s))" if more > 0 else "")


def _fill(template: str, ev: Mapping[str, Any]) -> str:
    out = template
    for key, value in ev.items():
        out = out.replace("{" + key + "%}", _pct(value)).replace("{" + key + "}", _n(value))
    return out


def apply_findings(draft: Draft, report: Mapping[str, Any],
                   sims: Sequence[Mapping[str, Any]] | None) -> tuple[list[str],
                                                                       list[dict[str, Any]]]:
    """Apply every warning/error finding to `draft`; returns the codes acted on and the
    `code_changes` entries."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for f in report.get("findings", []):
        if f.get("severity") in ACTIONABLE:
            groups.setdefault(f["code"], []).append(f)
    blocks = {b["name"]: b for b in report.get("blocks", [])}
    for code in sorted(groups):
        why = evidence(code, groups[code])
        if code in ADJUST or code in PLANS:
            for path, value in ADJUST.get(code, ()):
                draft.set(path, value, why, code)
                if path == CLIP:
                    _clip_params(draft, blocks, why, code)
        else:
            _generic(draft, groups[code], why, code)
    _layer_wise(draft, groups, len(blocks))
    changes = _structural(draft, report, groups, blocks, sims)
    return sorted(groups), changes


def _clip_params(draft: Draft, blocks: Mapping[str, Any], why: str, code: str) -> None:
    patterns = sorted({_glob(name) for name in blocks})
    draft.set(("gradient_clipping", "cross_attention_params"), patterns, why, code)


def _glob(name: str) -> str:
    """A block name with its numeric components as `*`: layers.3.cross_attn -> layers.*.cross_attn."""
    return ".".join("*" if part.isdigit() else part for part in name.split(".")) or "*"


def _generic(draft: Draft, findings: Sequence[Mapping[str, Any]], why: str, code: str) -> None:
    """A rule without an entry here: take its own remedy.config, leaf by leaf."""
    for f in findings[:1]:
        for path, value in _leaves(f.get("remedy", {}).get("config", {}), ()):
            if value is not None:
                draft.set(path, value, why, code)


def _leaves(tree: Mapping[str, Any], path: Path) -> list[tuple[Path, Any]]:
    out: list[tuple[Path, Any]] = []
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            out += _leaves(value, path + (str(key),))
        else:
            out.append((path + (str(key),), value))
    return out


def _layer_wise(draft: Draft, groups: Mapping[str, Sequence[Mapping[str, Any]]],
                n_blocks: int) -> None:
    hit = [c for c in LAYER_WISE if c in groups]
    if not hit or n_blocks < DEEP:
        return
    sick = {f.get("block") for c in hit for f in groups[c]}
    draft.set(("lr_schedule", "layer_wise_warmup"), True,
              f"{', '.join(hit)} in {len(sick)} of {n_blocks} cross-attention blocks: a deep "
              "stack; unfreeze the blocks one by one over the warmup", hit[0])


Pick = tuple[str, str, str, "Mapping[str, Any] | None"]  # fix, code, block, simulation


def _structural(draft: Draft, report: Mapping[str, Any],
                groups: Mapping[str, Sequence[Mapping[str, Any]]], blocks: Mapping[str, Any],
                sims: Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    """Choose the fixes per sick block, set their config keys, and group the code changes."""
    by = {(s["code"], s["block"], s["fix"]): s for s in sims or []}
    chosen: dict[str, dict[str, Any]] = {}
    for block, block_codes in sick_blocks(report).items():
        for fix_name, code, block_name, sim in _pick(block, block_codes, by):
            entry = chosen.setdefault(fix_name, {"codes": [], "blocks": [], "sims": []})
            entry["codes"].append(code)
            entry["blocks"].append(block_name)
            if sim is not None:
                entry["sims"].append(sim)
    out = []
    for name, entry in chosen.items():
        fix = FIXES[name]
        codes = sorted(set(entry["codes"]))
        primary = [c for c in codes if name in PLANS[c].fixes] or codes
        also = [c for c in codes if c not in primary]
        why = "; ".join(evidence(c, groups[c]) for c in primary)
        why += f" (the same fix clears {', '.join(also)})" if also else ""
        draft.set(fix.key, fix.value, f"{why}; {_sim_text(name, entry['sims'], sims is None)}",
                  primary[0])
        out.append({"fix": name, "codes": codes, "blocks": sorted(set(entry["blocks"])),
                    "summary": fix.summary, "snippet": snippet(fix, blocks[entry["blocks"][0]]),
                    "simulated": _sim_lines(entry["sims"]) or [
                        _sim_text(name, [], sims is None)]})
    return sorted(out, key=lambda c: (c["codes"][0], c["fix"]))


def _pick(block: str, codes: Mapping[str, Sequence[Trial]],
          by: Mapping[tuple[str, str, str], Mapping[str, Any]]) -> list[Pick]:
    """Greedy: the simulated fix that clears most of the block's findings, then the next; a
    finding no fix cleared gets its plan's first fix (simulated or not), if it has one."""
    order = list(dict.fromkeys(t.fix for ts in codes.values() for t in ts))
    left = [c for c in codes]
    picks: list[Pick] = []
    while left:
        cover = {f: [c for c in left if (by.get((c, block, f)) or {}).get("resolved")]
                 for f in order}
        best = max(order, key=lambda f: (len(cover[f]), -RANK[f]), default=None)
        if best is None or not cover[best]:
            break
        picks += [(best, c, block, by[(c, block, best)]) for c in cover[best]]
        left = [c for c in left if c not in cover[best]]
    for code in left:
        if codes[code]:
            t = next((t for t in codes[code] if (code, block, t.fix) in by), codes[code][0])
            picks.append((t.fix, code, block, by.get((code, block, t.fix))))
    return picks


def _sim_text(fix: str, sims: Sequence[Mapping[str, Any]], no_sims: bool) -> str:
    """The comment's account: each metric before -> after in the worst block, and a verdict."""
    if fix in NOT_SIMULATED:
        return f"not simulated: {NOT_SIMULATED[fix]}"
    if no_sims:
        return "not simulated: a report alone has no weights"
    if not sims:
        return "not simulated"
    worst = max(sims, key=lambda s: _num(s.get("before")))["block"]
    shown: dict[str, str] = {}
    for s in sims:
        if s["block"] == worst and s["metric"] not in shown:
            shown[s["metric"]] = f"{s['metric']} {_n(s['before'])} -> {_n(s['after'])}"
    ok = sum(1 for x in sims if x.get("resolved"))
    verdict = "all cleared" if ok == len(sims) else f"{ok} of {len(sims)} cleared"
    return (f"simulated with {FIXES[fix].label} in {worst}: {', '.join(shown.values())} "
            f"({verdict})")


def _sim_lines(sims: Sequence[Mapping[str, Any]]) -> list[str]:
    """One line per simulation for the code change's `simulated` list."""
    return [f"{s['code']} {s['block']}: {s['metric']} {_n(s['before'])} -> {_n(s['after'])} "
            f"({'cleared' if s.get('resolved') else 'not cleared'}: {s['threshold']})"
            for s in sims]
