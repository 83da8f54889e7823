import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tiny_models import FAMILIES, make_model, save_model  # noqa: E402


@pytest.fixture(scope="session")
def family_checkpoints(tmp_path_factory):
    """family -> (in-memory model, sharded checkpoint folder), built once per session."""
    root = tmp_path_factory.mktemp("families")
    out = {}
    for family in FAMILIES:
        model = make_model(family)
        out[family] = (model, save_model(model, root / family))
    return out
