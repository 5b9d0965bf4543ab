import json
import os
import tempfile
from pathlib import Path

import pytest
import torch

# Built-in assets (tokenizers, tiny models, the pydoc corpus) go to a per-session folder, never ~/.cache.
_HOME = Path(os.environ.get("LOWMEM_TEST_HOME") or tempfile.mkdtemp(prefix="lowmem-test-home-"))
os.environ["LOWMEM_HOME"] = str(_HOME)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def micro_model_path() -> str:
    from lowmem import assets

    return str(assets.tiny_model("micro-llama"))


@pytest.fixture(scope="session")
def tokenizer(micro_model_path):
    from lowmem.model import load_tokenizer

    return load_tokenizer(micro_model_path)


@pytest.fixture(scope="session")
def text_data(tmp_path_factory) -> str:
    """40 pydoc topics as a JSONL text dataset (~10k tokens with the micro tokenizer)."""
    from lowmem.assets import pydoc_texts

    path = tmp_path_factory.mktemp("data") / "docs.jsonl"
    with open(path, "w") as f:
        for text in pydoc_texts()[:40]:
            f.write(json.dumps({"text": text[:3000]}) + "\n")
    return str(path)


def write_jsonl(path: Path, rows: list[dict]) -> str:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def arch_path(micro_model_path, tmp_path_factory):
    """``arch_path(name)``: the folder of a tiny random model of that architecture (see ``tiny_archs``)."""
    from tiny_archs import tiny_arch

    root = tmp_path_factory.mktemp("archs")
    return lambda name: tiny_arch(name, micro_model_path, root)
