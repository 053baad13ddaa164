import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import tiny  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def llava_path(tmp_path_factory):
    """A tiny random LLaVA saved with save_pretrained (loaded back by each user of it)."""
    path = tmp_path_factory.mktemp("tiny-llava")
    tiny.build_llava(path)
    return path


@pytest.fixture(scope="session")
def _shared_llava(llava_path):
    return tiny.load(llava_path)


@pytest.fixture
def llava(_shared_llava):
    """The shared tiny LLaVA; any patch a test leaves behind is removed and reported as a failure."""
    yield _shared_llava
    tiny.fail_if_left_patched(_shared_llava)


@pytest.fixture(scope="session")
def features(tmp_path_factory):
    """The embedded model's tower features for 12 training and 4 validation scenes, written once for the
    learned methods' training tests (skipped in a copy without the embedded checkpoint)."""
    from vlprune.embedded import asset_dir
    from vlprune.embedded.features import extract

    try:
        asset_dir()
    except FileNotFoundError:
        pytest.skip("no embedded checkpoint in this copy")
    out = tmp_path_factory.mktemp("features")
    extract("train", 12, out, log=lambda *_: None)
    extract("val", 4, out, log=lambda *_: None)
    return out
