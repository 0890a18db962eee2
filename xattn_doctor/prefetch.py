"""Read the next block's tensors while the current one computes (used on a GPU, where the
reading would otherwise leave the device idle; on a CPU both compete for the same cores)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from xattn_doctor.checkpoint import Checkpoint
from xattn_doctor.layouts._base import BlockSpec


def blocks_with_tensors(ckpt: Checkpoint, specs: Sequence[BlockSpec],
                        ahead: bool) -> Iterator[tuple[BlockSpec, dict[str, Any]]]:
    """Each block with its tensors; with `ahead`, block i+1 is read while block i is used."""
    if not ahead or len(specs) < 2:
        for spec in specs:
            yield spec, ckpt.load(dict(spec.refs()))
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="xattn-read") as pool:
        pending = pool.submit(ckpt.load, dict(specs[0].refs()))
        for i, spec in enumerate(specs):
            tensors = pending.result()
            if i + 1 < len(specs):
                pending = pool.submit(ckpt.load, dict(specs[i + 1].refs()))
            yield spec, tensors
