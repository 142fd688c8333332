"""Model files from strangers: a weights file must never be able to run code.

``imgrank.models.clip.weights.read_state_dict`` reads ``.safetensors`` with safetensors
and ``.pt``/``.bin``/``.pth`` with ``torch.load(weights_only=True)``; a pickle
that would call a function while loading is refused with a message naming
the file, and the function never runs.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from imgrank.errors import ModelError  # noqa: E402
from imgrank.models.clip.weights import read_state_dict  # noqa: E402


class _RunsCodeWhenUnpickled:
    """Unpickling this calls ``exec``, which writes a marker file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",))


def _check_refused(path: Path, marker: Path) -> None:
    with pytest.raises(ModelError) as info:
        read_state_dict(path)
    message = str(info.value)
    assert str(path) in message
    assert "pickled code is refused" in message or "does not hold a dict of tensors" in message
    assert not marker.exists(), "loading the file ran the code inside it"


@pytest.mark.parametrize("suffix", [".pt", ".bin", ".pth"])
def test_a_torch_checkpoint_that_would_run_code_is_refused(tmp_path: Path, suffix: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / f"weights{suffix}"
    torch.save({"visual.proj": torch.zeros(2, 2), "payload": _RunsCodeWhenUnpickled(marker)}, path)
    _check_refused(path, marker)


def test_a_plain_pickle_that_would_run_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "weights.bin"
    path.write_bytes(pickle.dumps({"w": _RunsCodeWhenUnpickled(marker)}, protocol=2))
    _check_refused(path, marker)


def test_a_pickle_named_safetensors_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "model.safetensors"
    torch.save({"payload": _RunsCodeWhenUnpickled(marker)}, path)
    _check_refused(path, marker)


def test_plain_tensor_files_still_load(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    weights = {"visual.proj": torch.arange(4.0).reshape(2, 2)}
    save_file(weights, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": {"module.visual.proj": weights["visual.proj"]}}, tmp_path / "w.pt")
    for name in ("w.safetensors", "w.pt"):
        state = read_state_dict(tmp_path / name)
        assert list(state) == ["visual.proj"]
        assert torch.equal(state["visual.proj"], weights["visual.proj"])


def test_the_refusal_never_tells_the_user_to_load_the_file_anyway(tmp_path: Path) -> None:
    """torch's own message suggests weights_only=False; imgrank's says what to do instead."""
    marker = tmp_path / "pwned"
    path = tmp_path / "weights.pt"
    torch.save({"visual.proj": torch.zeros(2, 2), "payload": _RunsCodeWhenUnpickled(marker)}, path)
    with pytest.raises(ModelError) as info:
        read_state_dict(path)
    message = str(info.value)
    assert "weights_only" not in message and "can still be loaded" not in message
    assert "\x1b[" not in message  # no terminal colour codes either
    assert "will not run it" in message and ".safetensors" in message and str(path) in message
    assert not marker.exists()
