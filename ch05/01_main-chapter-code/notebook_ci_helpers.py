"""The smoke-test mode of ch05.ipynb and exercise-solutions.ipynb.

Both notebooks have one switch, `SMOKE_TEST`, in their `parameters` cell. With it on
(the repository's notebook tests turn it on), the notebook calls `smoke_test_settings`
once, right after its settings, and then runs every cell unchanged, in a minute or two
instead of an hour:

- the chapter's GPT config becomes a tiny model and training one short epoch;
- the files the notebooks write (model.pth, model_and_optimizer.pth, the gpt2/ download
  folder) go to a scratch folder instead of the chapter's folder;
- OpenAI's GPT-2 is replaced by a tiny random GPT-2 in OpenAI's file layout, served on
  127.0.0.1: the notebook tests serve one and say where in $GPT2_BASE_URL; without
  that, one is started here (it needs the test dependencies: TensorFlow, transformers);
- the exercise notebook, which continues from the files the chapter saved, gets tiny
  stand-ins for them.

A learner never needs this module; its outputs are only good for checking that the
cells run.
"""

import os
import sys
import tempfile
from pathlib import Path

import torch

from previous_chapters import GPTModel

SCRATCH_ENV = "CH05_NOTEBOOK_TMP"  # scratch folder the notebook tests provide
GPT2_BASE_URL_ENV = "GPT2_BASE_URL"  # where gpt_download.py looks for OpenAI's files
TINY_MODEL = {"context_length": 64, "emb_dim": 32, "n_heads": 2, "n_layers": 2}
SHORT_TRAINING = {"num_epochs": 1, "batch_size": 4, "eval_freq": 5, "eval_iter": 2}

_stand_in_servers = []  # keeps a server started here alive while the kernel runs


def scratch_dir() -> Path:
    """The tests' scratch folder if they gave one, else a new temporary folder."""
    folder = os.environ.get(SCRATCH_ENV) or tempfile.mkdtemp(prefix="ch05-smoke-test-")
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    return path


def ensure_stand_in_gpt2(folder: Path) -> str:
    """Make $GPT2_BASE_URL serve a tiny random GPT-2 and return that URL.

    If the variable is already set (the notebook tests set it) it is used as is.
    Otherwise the tests' stand-in (tests/openai_checkpoint.py) is written into
    `folder` and served on 127.0.0.1 for as long as the kernel runs.
    """
    if os.environ.get(GPT2_BASE_URL_ENV):
        return os.environ[GPT2_BASE_URL_ENV]
    tests_dir = Path(__file__).resolve().parents[2] / "tests"
    if not (tests_dir / "openai_checkpoint.py").is_file():
        raise FileNotFoundError(f"Smoke-test mode needs ${GPT2_BASE_URL_ENV} or the repository's "
                                "tests/openai_checkpoint.py to stand in for OpenAI's GPT-2.")
    sys.path.append(str(tests_dir))
    from openai_checkpoint import start_tiny_gpt2

    tiny = start_tiny_gpt2(folder / "stand-in-gpt2")
    _stand_in_servers.append(tiny.server)
    os.environ[GPT2_BASE_URL_ENV] = tiny.base_url
    return tiny.base_url


def write_stand_in_checkpoints(gpt_config: dict, settings: dict, files: dict) -> None:
    """Tiny versions of what ch05.ipynb section 5.4 saves: `files["model"]` (a state
    dict) and `files["checkpoint"]` (model and AdamW state after one training step)."""
    torch.manual_seed(123)
    model = GPTModel(gpt_config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings["learning_rate"],
                                  weight_decay=settings["weight_decay"])
    tokens = torch.randint(0, gpt_config["vocab_size"], (2, gpt_config["context_length"] + 1))
    logits = model(tokens[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    optimizer.step()
    torch.save(model.state_dict(), files["model"])
    torch.save({"model_state_dict": model.state_dict(), "optimizer_state_dict": optimizer.state_dict()},
               files["checkpoint"])


def smoke_test_settings(gpt_config: dict, settings: dict, files: dict, *,
                        stand_in_checkpoints: bool = False) -> tuple[dict, dict, dict]:
    """The notebook's (config, training settings, files) shrunk for a quick check.

    Files keep their names but move to the scratch folder. With `stand_in_checkpoints`
    the files of section 5.4 are written there too, for notebooks that start from them.
    """
    folder = scratch_dir()
    gpt_config = {**gpt_config, **TINY_MODEL}
    settings = {**settings, **{k: v for k, v in SHORT_TRAINING.items() if k in settings}}
    files = {key: str(folder / Path(name).name) for key, name in files.items()}
    ensure_stand_in_gpt2(folder)
    if stand_in_checkpoints:
        write_stand_in_checkpoints(gpt_config, settings, files)
    return gpt_config, settings, files
