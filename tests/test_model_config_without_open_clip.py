"""Named model configs are read from open_clip's JSON files, without importing open_clip.

An adapter folder names its backbone (e.g. ViT-B-32); checking it used to import
open_clip, torchvision and torch._dynamo (1.4 s idle) before a cached re-sort could
skip the backbone.
"""

from __future__ import annotations

import json
import subprocess
import sys

import open_clip
import pytest

from imgrank.errors import ModelError
from imgrank.models.clip.config import BackboneSpec, resolve_model_config


def test_a_named_config_resolves_without_importing_open_clip() -> None:
    code = (
        "import json, sys\n"
        "from imgrank.models.clip.config import BackboneSpec, resolve_model_config\n"
        "_name, config = resolve_model_config(BackboneSpec('ViT-B-32', 'none'))\n"
        "print(json.dumps(config)); print('open_clip' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    config, imported = done.stdout.strip().splitlines()
    assert imported == "False"
    assert json.loads(config) == open_clip.get_model_config("ViT-B-32")


def test_an_unknown_name_still_gets_open_clips_suggestions() -> None:
    with pytest.raises(ModelError, match="Did you mean: ViT-B-32"):
        resolve_model_config(BackboneSpec("ViT-B-33", "none"))
