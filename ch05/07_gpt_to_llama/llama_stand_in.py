"""What changes when the automated tests run this folder's notebooks (`SMOKE_TEST = True`).

Meta's weights and tokenizers are gated (an account and a license click), so the tests
cannot download them. A notebook's CI cell calls `activate(globals())`, and from then
on the notebook's own cells, unchanged, run on tiny random stand-ins:

* `huggingface_hub.hf_hub_download` returns tiny files of the requested repository's
  layout (made by tiny_llama_checkpoint.py: Meta's consolidated.00.pth for Llama 2,
  safetensors shards and a tiktoken tokenizer.model for Llama 3.x), and
  `huggingface_hub.login` does nothing;
* every config dict the notebook defines under a LLAMA..._CONFIG... name is shrunk in
  place to the stand-ins' sizes right after the cell that defines it (an IPython
  post-run hook), so the models the notebook builds fit the tiny weights.

The text generated from random weights is gibberish; the tests check that the code
runs, tests/ check what it computes. Nothing here is used outside CI mode.
"""

import functools
import os
import re
import tempfile
from pathlib import Path

import torch
from tiny_llama_checkpoint import (
    SAMPLE_TEXT,
    TINY_DIMS,
    make_tiny_llama3_checkpoint,
    make_tiny_meta_llama2_checkpoint,
    train_byte_bpe,
    write_tiktoken_ranks,
)

CONFIG_NAME = re.compile(r"^LLAMA\d*_CONFIG")
N_MERGES = 200            # tiktoken merges of the stand-in tokenizer
LLAMA2_STAND_IN_VOCAB = 300
MAX_CONTEXT = 512         # positions of the shrunk configs (smaller RoPE tables)


@functools.cache
def llama3_vocab_size() -> int:
    """The stand-in Llama 3 vocabulary: its learned ranks plus the 256 special tokens."""
    return len(train_byte_bpe(SAMPLE_TEXT, N_MERGES)) + 256


def shrink_config(cfg: dict) -> None:
    """Give a book-style Llama config the stand-ins' sizes, in place (aliases see it too)."""
    if cfg.get("emb_dim") == TINY_DIMS["hidden_size"]:
        return  # already shrunk
    llama2 = cfg["vocab_size"] == 32_000
    cfg.update(vocab_size=LLAMA2_STAND_IN_VOCAB if llama2 else llama3_vocab_size(),
               emb_dim=TINY_DIMS["hidden_size"], hidden_dim=TINY_DIMS["intermediate_size"],
               n_layers=TINY_DIMS["num_hidden_layers"], n_heads=TINY_DIMS["num_attention_heads"],
               context_length=min(cfg["context_length"], MAX_CONTEXT), dtype=torch.float32)
    if "n_kv_groups" in cfg:
        cfg["n_kv_groups"] = cfg["n_heads"] if llama2 else cfg["n_heads"] // 4


def shrink_configs(namespace: dict) -> None:
    for name, value in list(namespace.items()):
        if CONFIG_NAME.match(name) and isinstance(value, dict) and "emb_dim" in value:
            shrink_config(value)


def llama_version(repo_id: str) -> str:
    """'2', '3', '3.1' or '3.2' from a Meta repository name such as meta-llama/Llama-3.2-1B-Instruct."""
    match = re.search(r"Llama-(\d(?:\.\d)?)-", repo_id)
    if not match:
        raise ValueError(f"the CI stand-in knows no files for {repo_id}")
    return match.group(1)


def stand_in_download(folder: Path, repo_id: str, filename: str, **kwargs) -> str:
    """`hf_hub_download` for CI: the path of a tiny stand-in for `filename` of `repo_id`."""
    version = llama_version(repo_id)
    repo_dir = folder / repo_id.replace("/", "--")
    if version == "2":
        if not (repo_dir / "consolidated.00.pth").is_file():
            make_tiny_meta_llama2_checkpoint(repo_dir)
        return str(repo_dir / filename)
    if filename.endswith("tokenizer.model"):
        return str(write_tiktoken_ranks(train_byte_bpe(SAMPLE_TEXT, N_MERGES), repo_dir / filename))
    shards = re.search(r"-of-(\d+)\.safetensors$", filename)
    n_shards = int(shards.group(1)) if shards else 1
    weights_dir = repo_dir / f"{n_shards}-shards"
    if not (weights_dir / "config.json").is_file():
        make_tiny_llama3_checkpoint(weights_dir, version, N_MERGES, context_length=MAX_CONTEXT, n_shards=n_shards)
    return str(weights_dir / filename)


def activate(namespace: dict) -> Path:
    """Switch the calling notebook to the stand-ins (see the module docstring); returns their folder."""
    import huggingface_hub
    from IPython import get_ipython

    folder = Path(os.environ.get("CH05_NOTEBOOK_TMP") or tempfile.mkdtemp()) / "llama-stand-ins"
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["HF_TOKEN"] = "hf_ci_stand_in"  # what a reader exports; login below is a no-op
    huggingface_hub.hf_hub_download = functools.partial(stand_in_download, folder)
    huggingface_hub.login = lambda *args, **kwargs: None
    get_ipython().events.register("post_run_cell", lambda result: shrink_configs(namespace))
    return folder
