"""Build the live model for model mode: the class config.json names (transformers or
diffusers, local files only, nothing fetched), or a user's MODULE:CALLABLE factory whose module
then gets the checkpoint's weights one tensor at a time (no full second copy in memory)."""

from __future__ import annotations

import importlib
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from xattn_doctor.checkpoint import Checkpoint, read_tensor
from xattn_doctor.errors import UsageError

OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "DIFFUSERS_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


@dataclass
class Built:
    """The model, and what loading it said (missing/unexpected keys, which class)."""

    model: nn.Module
    notes: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


def build(spec: str, ckpt: Checkpoint, dtype: torch.dtype) -> Built:
    """`auto` or `MODULE:CALLABLE` to a model holding the checkpoint's weights, on the CPU."""
    if spec == "auto":
        return build_auto(ckpt, dtype)
    return build_callable(spec, ckpt, dtype)


def build_auto(ckpt: Checkpoint, dtype: torch.dtype) -> Built:
    """The class config.json names, loaded with its library's from_pretrained (local only)."""
    if ckpt.config_path is None:
        raise UsageError(ckpt.path, "--model auto needs the config.json beside the weights")
    try:
        cfg = json.loads(ckpt.config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UsageError(ckpt.config_path, f"cannot read config.json: {e}") from e
    if not isinstance(cfg, dict):
        raise UsageError(ckpt.config_path, "config.json is not a JSON object")
    if isinstance(cfg.get("_class_name"), str):
        lib, name = "diffusers", cfg["_class_name"]
    elif isinstance(cfg.get("architectures"), list) and cfg["architectures"] \
            and isinstance(cfg["architectures"][0], str):
        lib, name = "transformers", cfg["architectures"][0]
    else:
        raise UsageError(ckpt.config_path, "config.json names no model class (no "
                                           "'architectures' list, no diffusers '_class_name'); "
                                           "use --model MODULE:CALLABLE")
    os.environ.update(OFFLINE)
    try:
        module = importlib.import_module(lib)
    except ImportError:
        raise UsageError(None, f"--model auto: {name} is a {lib} class, and {lib} is not "
                               f"installed (pip install {lib})") from None
    _quiet(module)
    cls = getattr(module, name, None)
    if cls is None:
        raise UsageError(ckpt.config_path, f"{lib} {getattr(module, '__version__', '')} has "
                                           f"no class {name!r}")
    folder = ckpt.config_path.parent
    kw: dict[str, Any] = {"local_files_only": True, "output_loading_info": True}
    kw["dtype" if lib == "transformers" else "torch_dtype"] = dtype
    try:
        model, info = cls.from_pretrained(str(folder), **kw)
    except Exception as e:  # the library's own message says what did not fit
        raise UsageError(folder, f"{lib} could not load {name} from these weights: "
                                 f"{' '.join(str(e).split())[:300]}") from None
    built = Built(model, [f"built {lib}.{name} from {ckpt.config_path.name} (local files)"])
    _loading_notes(built, list(info.get("missing_keys", [])),
                   list(info.get("unexpected_keys", [])),
                   list(info.get("mismatched_keys", [])))
    return built


def _quiet(library: Any) -> None:
    """No progress bars or load warnings on stderr: the report lists what loading said."""
    log = getattr(getattr(library, "utils", None), "logging", None)
    for fn in ("disable_progress_bar", "set_verbosity_error"):
        if callable(getattr(log, fn, None)):
            getattr(log, fn)()


def build_callable(spec: str, ckpt: Checkpoint, dtype: torch.dtype) -> Built:
    """The user's factory's module, with the checkpoint's tensors copied in one by one."""
    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise UsageError(None, f"--model {spec!r}: use auto or MODULE:CALLABLE")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        factory = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as e:
        raise UsageError(None, f"--model {spec}: cannot import it "
                               f"({type(e).__name__}: {' '.join(str(e).split())})") from None
    try:
        model = factory()
    except Exception as e:
        raise UsageError(None, f"--model {spec}: calling it failed ({type(e).__name__}: "
                               f"{' '.join(str(e).split())[:200]})") from None
    if not isinstance(model, nn.Module):
        raise UsageError(None, f"--model {spec} returned a {type(model).__name__}, not a "
                               "torch nn.Module")
    model = model.to(dtype) if dtype != torch.float32 else model
    state = model.state_dict(keep_vars=True)
    unexpected, mismatched = [], []
    with torch.no_grad():
        for key, header in ckpt.where.items():
            target = state.get(key)
            if target is None:
                unexpected.append(key)
                continue
            if tuple(target.shape) != tuple(header.tensors[key].shape):
                mismatched.append(f"{key} {list(header.tensors[key].shape)} vs "
                                  f"{list(target.shape)}")
                continue
            target.copy_(read_tensor(header, key))
    missing = [k for k in state if k not in ckpt.where]
    built = Built(model, [f"built by {spec}; weights copied from the checkpoint"])
    _loading_notes(built, missing, unexpected, mismatched)
    return built


def _loading_notes(built: Built, missing: list[str], unexpected: list[str],
                   mismatched: list[Any]) -> None:
    if mismatched:
        raise UsageError(None, "the weights do not fit the model class: shape mismatch at "
                               + "; ".join(str(m) for m in mismatched[:3]))
    built.missing = sorted(missing)
    if missing:
        built.notes.append(f"{len(missing)} model tensor(s) not in the checkpoint (left as "
                           f"initialised): {_some(missing)}")
    if unexpected:
        built.notes.append(f"{len(unexpected)} checkpoint tensor(s) the model does not take: "
                           f"{_some(unexpected)}")


def _some(keys: list[str], n: int = 8) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def check_blocks_loaded(built: Built, roles: dict[str, dict[str, str]]) -> None:
    """Missing cross-attention weights are exit 2: the blocks would be measured at init."""
    missing = set(built.missing)
    lost = [f"{block or '<root>'}.{role} ({key})" for block, by_role in roles.items()
            for role, key in by_role.items() if key in missing]
    if lost:
        raise UsageError(None, "the checkpoint lacks cross-attention weights the model has: "
                               + _some(lost, 4))

