"""live_path: a block saved under other prefixes is found at its live module path."""

from __future__ import annotations

from xattn_doctor.layouts._base import BlockSpec, Linear, TensorRef
from xattn_doctor.layouts._livepath import live_path, live_prefix


def _spec(name: str, learned: str | None = None) -> BlockSpec:
    lin = {r: Linear(TensorRef(f"{name}.attn.{r}.weight")) for r in "qkv"}
    return BlockSpec(name=name, layout="t", heads=1, kv_heads=1, head_dim=4, query_dim=4,
                     context_dim=4, q=lin["q"], k=lin["k"], v=lin["v"], o=None,
                     learned_queries=TensorRef(learned) if learned else None)


LIVE = {f"model.lm.layers.{i}.attn.{r}.weight" for i in (1, 3) for r in "qkv"} | {"queries"}


def test_renamed_prefix_found_by_shared_suffix() -> None:
    spec = _spec("lm.model.layers.3")
    assert live_prefix(LIVE, spec) == "model.lm.layers.3"
    assert live_path(LIVE, spec, "lm.model.layers.3.attn") == "model.lm.layers.3.attn"
    assert live_path(LIVE, spec, "elsewhere.norm") is None


def test_same_names_and_keys_outside_the_block() -> None:
    assert live_prefix(LIVE, _spec("model.lm.layers.1", learned="queries")) == "model.lm.layers.1"
    assert live_path(LIVE, _spec("model.lm.layers.1"), "model.lm.layers.1.attn") == \
        "model.lm.layers.1.attn"


def test_ambiguous_or_missing_is_none() -> None:
    assert live_prefix(LIVE, _spec("other.block")) is None  # layers.1 and layers.3 tie
    assert live_prefix(LIVE, _spec("x.layers.7")) is None
