"""The oldest torch and onnxruntime imgrank runs on, checked where they are used.

pyproject.toml states the same floors, but an environment can still hold an
older release (``pip install --no-deps``, a conda or system package), and for
these two an old release is not merely slower:

* torch before 2.6: ``torch.load(weights_only=True)``, which imgrank relies on
  to refuse pickled code in ``.pt``/``.pth``/``.bin`` weights, could be
  bypassed (CVE-2025-32434, fixed in 2.6). Such files are refused on those
  releases; ``.safetensors`` files need no pickle and still load.
* onnxruntime before 1.20 cannot load imgrank's own text encoder (it lacks
  the ``ArgMax`` version the export uses); 1.20.1 passes the ONNX tests.
"""

from __future__ import annotations

import re
from typing import Any

from imgrank.errors import ModelError

#: torch.load(weights_only=True) cannot be bypassed from this release on.
MIN_TORCH = (2, 6)

#: The first onnxruntime that loads and runs every graph `imgrank export` writes.
MIN_ONNXRUNTIME = (1, 20)


def release(version: str) -> tuple[int, int]:
    """``(major, minor)`` of a version string such as ``2.6.0+cu124`` or ``1.20.1``."""
    match = re.match(r"\s*(\d+)\.(\d+)", version)
    if match is None:
        return (0, 0)
    return int(match.group(1)), int(match.group(2))


def _text(floor: tuple[int, int]) -> str:
    return ".".join(str(part) for part in floor)


def check_torch_load_is_safe(torch: Any, path: object) -> None:
    """Refuse to unpickle a weights file on a torch whose ``weights_only`` can be bypassed.

    Raises:
        ModelError: torch is older than :data:`MIN_TORCH`.
    """
    found = str(getattr(torch, "__version__", "0"))
    if release(found) < MIN_TORCH:
        raise ModelError(
            f"refusing to read {path} with torch {found}: before torch {_text(MIN_TORCH)} a "
            "pickled weights file can run code despite weights_only=True. Upgrade torch "
            f"(pip install 'torch>={_text(MIN_TORCH)}'), or use a .safetensors file"
        )


def check_onnxruntime(ort: Any) -> None:
    """Refuse an onnxruntime too old to run imgrank's exported graphs.

    Raises:
        ModelError: onnxruntime is older than :data:`MIN_ONNXRUNTIME`.
    """
    found = str(getattr(ort, "__version__", "0"))
    if release(found) < MIN_ONNXRUNTIME:
        raise ModelError(
            f"onnxruntime {found} cannot run imgrank's exported models (it lacks operators "
            f"they use); upgrade it: pip install 'onnxruntime>={_text(MIN_ONNXRUNTIME)}'"
        )
