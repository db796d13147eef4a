"""Fixtures of the user-interface tests: a tiny model, saved the way gpt_train.py saves it.

Chainlit writes a few files into its app folder when it is imported (`.files/`,
`.chainlit/translations/`, both git-ignored). Pointing CHAINLIT_APP_ROOT at this folder
before any test imports Chainlit keeps them here, and makes the tests use this
folder's `.chainlit/config.toml`, instead of writing into the directory pytest runs from.
"""

import os
import re
import string
from pathlib import Path

import pytest
import torch

APP_DIR = Path(__file__).resolve().parent.parent
os.environ.setdefault("CHAINLIT_APP_ROOT", str(APP_DIR))
# torch.compile takes a minute per model shape on a busy 2-core machine, and every test
# here builds its own tiny model: the tests run the decoding step as plain PyTorch
# (servers they start inherit this), except those that ask for the compiled step.
os.environ.setdefault("CH05_COMPILE", "0")

from ch05_utils import save_checkpoint_atomic  # noqa: E402
from previous_chapters import GPT_CONFIG_124M, GPTModel  # noqa: E402

TINY_CONFIG = {**GPT_CONFIG_124M, "context_length": 64, "emb_dim": 32, "n_heads": 2, "n_layers": 2}


def write_tiny_checkpoint(path: Path, seed: int = 0) -> dict:
    """A random tiny GPTModel saved like gpt_train.py saves it (the "model" and "config" keys).

    gpt_train.py itself would take minutes on a busy 2-core machine for even one step
    of evaluation and sampling; the apps read nothing else from its checkpoints.
    """
    torch.manual_seed(seed)
    model = GPTModel(TINY_CONFIG)
    save_checkpoint_atomic({"model": model.state_dict(), "config": TINY_CONFIG}, path)
    return model.state_dict()


def unescape_markdown(markdown: str) -> str:
    """Undo ui_chainlit_handlers.MarkdownEscaper: the text the page shows for a message."""
    text = re.sub(r"\\([" + re.escape(string.punctuation) + "])", r"\1", markdown.replace("  \n", "\n"))
    return text.replace("\u00a0", " ")


@pytest.fixture(scope="session")
def unescape():
    return unescape_markdown


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ui_checkpoint") / "checkpoint.pth"
    write_tiny_checkpoint(path)
    return path


@pytest.fixture(scope="session")
def tiny_chat(tiny_checkpoint):
    from ui_chat_core import load_own_checkpoint

    return load_own_checkpoint(tiny_checkpoint, device="cpu")


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Run this folder's tests on one thread: the models are tiny, and on a busy machine
    two threads that wait for each other at every operation are many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
