"""Test set-up shared by every folder.

Each ch05 folder is put on sys.path so tests can import its modules by name. This is
safe because a module name may appear in two folders only when it is a synced copy
of the same file (tests/test_shared_code.py checks both rules).

Offline data: if `../shared/data` exists beside the repository (CI and the course's
development machines), tests read the-verdict and tiktoken's BPE files from it unless
the environment already says otherwise.
"""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent
SHARED_DATA = ROOT.parent / "shared" / "data"

for folder in sorted((ROOT / "ch05").glob("[0-9][0-9]_*"), reverse=True):  # 01 ends up first
    sys.path.insert(0, str(folder))
sys.path.append(str(ROOT / "tests"))  # test helpers such as openai_checkpoint.py

if SHARED_DATA.is_dir():
    os.environ.setdefault("CH05_DATA_DIR", str(SHARED_DATA))
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED_DATA / "tiktoken-cache"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session")
def gpt2_test_server(tmp_path_factory):
    """A tiny random GPT-2 in OpenAI's checkpoint layout, served over HTTP on 127.0.0.1.

    Yields a `TinyGPT2` (tests/openai_checkpoint.py): `.base_url` (use it as GPT2_BASE_URL),
    `.hf_model` (the transformers reference model), `.folder`, `.hparams`, `.server`.
    """
    from openai_checkpoint import start_tiny_gpt2

    tiny = start_tiny_gpt2(tmp_path_factory.mktemp("openai-gpt2"))
    yield tiny
    tiny.server.stop()
