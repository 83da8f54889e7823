import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton reads TRITON_INTERPRET when a kernel is decorated: set it before any test imports triton,
# so the Triton kernels run on the CPU interpreter wherever there is no GPU (CI).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

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
