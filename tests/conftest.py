"""Shared test helpers: fixture paths and a factory for tiny checkpoints built in tmp dirs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(FIXTURES))


@pytest.fixture
def fixtures_dir() -> Path:
    """The shipped fixtures folder."""
    return FIXTURES


@pytest.fixture
def save_ckpt(tmp_path: Path):  # type: ignore[no-untyped-def]
    """save_ckpt(state_dict, config=None, probe=None, name='m') -> folder with model/probe/config."""
    from safetensors.torch import save_file

    def _save(sd, config=None, probe=None, name="m"):  # type: ignore[no-untyped-def]
        folder = tmp_path / name
        folder.mkdir()
        save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"))
        if config is not None:
            (folder / "config.json").write_text(json.dumps(config))
        if probe is not None:
            save_file({k: v.contiguous() for k, v in probe.items()},
                      str(folder / "probe.safetensors"))
        return folder

    return _save
