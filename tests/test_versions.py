"""Version floors (issue 17 item 9): releases that are unsafe or cannot run imgrank are refused.

torch before 2.6 could be made to run code through torch.load(weights_only=True);
onnxruntime before 1.20 cannot run imgrank's own text encoder. An environment
can hold such a release despite pyproject.toml, so the check is where they are
used. (CI also runs tests/test_onnx.py on exactly the onnxruntime floor.)
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from imgrank.errors import ModelError
from imgrank.versions import MIN_ONNXRUNTIME, MIN_TORCH, release

ROOT = Path(__file__).resolve().parents[1]


def test_release_reads_local_and_cuda_versions() -> None:
    assert release("2.6.0+cu124") == (2, 6)
    assert release("2.5.1") < MIN_TORCH <= release("2.6.0") <= release("2.14.1")
    assert release("1.19.2") < MIN_ONNXRUNTIME <= release("1.20.1") <= release("1.32.0")


def test_pyproject_states_the_floors_imgrank_checks() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["onnx"]]
    floors = {
        m.group(1): release(m.group(2))
        for m in (re.match(r"([A-Za-z_-]+)>=([\d.]+)", d) for d in wanted)
        if m
    }
    assert floors["torch"] == MIN_TORCH and floors["onnxruntime"] == MIN_ONNXRUNTIME


def test_an_unsafe_torch_reads_no_pickled_weights_but_safetensors_still(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch
    from safetensors.torch import save_file

    from imgrank.models.clip.weights import read_state_dict

    state = {"w": torch.ones(2)}
    torch.save(state, tmp_path / "weights.pt")
    save_file(state, tmp_path / "weights.safetensors")
    monkeypatch.setattr(torch, "__version__", "2.5.1")
    with pytest.raises(ModelError, match=r"refusing to read .*torch 2\.5\.1.*torch>=2\.6"):
        read_state_dict(tmp_path / "weights.pt")
    assert torch.equal(read_state_dict(tmp_path / "weights.safetensors")["w"], torch.ones(2))


def test_an_onnxruntime_older_than_the_floor_is_one_message(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    onnxruntime = pytest.importorskip("onnxruntime")
    from imgrank.models.onnx_runtime import _import_onnxruntime

    monkeypatch.setattr(onnxruntime, "__version__", "1.19.2")
    with pytest.raises(ModelError, match=r"onnxruntime 1\.19\.2 .*onnxruntime>=1\.20"):
        _import_onnxruntime()
