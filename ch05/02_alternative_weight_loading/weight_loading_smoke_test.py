"""The smoke-test mode of this folder's three notebooks.

Each notebook has one switch, `SMOKE_TEST`, in its `parameters` cell. The repository's
notebook tests turn it on (tests/test_notebooks.py, from each notebook's
`ci_parameters`); the notebook then calls one function here, right after its settings,
and runs every cell unchanged. Instead of GPT-2 from the Hugging Face Hub (which these
machines cannot reach), a tiny random GPT-2 is written into a scratch folder under the
file names the notebook expects, and the notebook works in that folder. Its text is
gibberish, but every loading step runs for real. A learner never needs this module.
"""

import os
import tempfile
from pathlib import Path

import torch

SCRATCH_ENV = "CH05_NOTEBOOK_TMP"  # scratch folder the notebook tests provide
TINY_MODEL = {"context_length": 64, "emb_dim": 48, "n_heads": 4, "n_layers": 2}


def scratch_dir() -> Path:
    """The tests' scratch folder if they gave one, else a new temporary folder."""
    folder = Path(os.environ.get(SCRATCH_ENV) or tempfile.mkdtemp(prefix="weight-loading-smoke-test-"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def tiny_hf_gpt2(seed: int = 123):
    """A small random `transformers` GPT2LMHeadModel; every tensor is random (std 0.2), so a
    weight in the wrong place, untransposed or mis-split changes the logits."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_positions=TINY_MODEL["context_length"], n_embd=TINY_MODEL["emb_dim"],
                        n_layer=TINY_MODEL["n_layers"], n_head=TINY_MODEL["n_heads"],
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2)
    return model


def pytorch_stand_ins(base_config: dict, file_stem: str) -> dict:
    """weight-loading-pytorch.ipynb: write `<file_stem>.pth` and `<file_stem>.safetensors`
    (GPTModel state dicts, as in the course's Hub repository), change into their folder,
    and return the tiny model's config."""
    from convert_gpt2_weights import hf_to_gpt_state_dict, save_safetensors

    config = {**base_config, **TINY_MODEL}
    state_dict = hf_to_gpt_state_dict(tiny_hf_gpt2().state_dict(), TINY_MODEL["n_layers"])
    folder = scratch_dir()
    torch.save({k: v.clone() for k, v in state_dict.items()}, folder / f"{file_stem}.pth")
    save_safetensors(state_dict, config, folder / f"{file_stem}.safetensors")
    os.chdir(folder)
    return config


def transformers_stand_in(base_config: dict) -> tuple[dict, str]:
    """weight-loading-hf-transformers.ipynb: save a tiny GPT-2 with `save_pretrained`;
    return the tiny model's config and the folder, which `from_pretrained` reads like a Hub id."""
    folder = scratch_dir() / "tiny-gpt2"
    tiny_hf_gpt2().save_pretrained(folder)
    return {**base_config, **TINY_MODEL}, str(folder)


def safetensors_stand_in(base_config: dict, output_file: str) -> dict:
    """weight-loading-hf-safetensors.ipynb: write `output_file` in the layout of the Hub's
    GPT-2 `model.safetensors` (names `h.0...`, no `transformer.` prefix, no lm_head), change
    into its folder, and return the tiny model's config."""
    from safetensors.torch import save_file

    tensors = {name.removeprefix("transformer."): t.contiguous() for name, t in tiny_hf_gpt2().state_dict().items()
               if name != "lm_head.weight"}
    folder = scratch_dir()
    save_file(tensors, folder / output_file)
    os.chdir(folder)
    return {**base_config, **TINY_MODEL}
