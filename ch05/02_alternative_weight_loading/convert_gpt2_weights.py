"""Convert GPT-2 weights between OpenAI's checkpoint, Hugging Face, safetensors and the chapter's GPTModel.

    python convert_gpt2_weights.py gpt2/124M model-124M.pth                 # OpenAI -> our .pth
    python convert_gpt2_weights.py gpt2/124M gpt2-124M-hf --to hf           # OpenAI -> Hugging Face
    python convert_gpt2_weights.py openai-community/gpt2 gpt2.pth           # Hugging Face Hub -> our .pth
    python convert_gpt2_weights.py gpt2.pth gpt2-small-124M.safetensors --to safetensors
    python convert_gpt2_weights.py ../01_main-chapter-code/output/checkpoint.pth my-gpt --to hf --verify

INPUT is recognized by what it is:
  * a folder with `hparams.json` and `model.ckpt.*`: OpenAI's TensorFlow checkpoint;
  * a folder with `config.json` and `model.safetensors`: a Hugging Face GPT-2;
  * a `.pth` file: gpt_train.py's checkpoint.pth, the book's model.pth (a plain state dict of
    GPTModel) or the book's model_and_optimizer.pth; a file without a config gets one from the
    tensors' shapes (`--n-heads` when the width is not one of GPT-2's);
  * a `.safetensors` file: a state dict of GPTModel (as in the course's Hub repository
    rasbt/gpt2-from-scratch-pytorch) or a Hugging Face GPT-2's tensors without config.json;
  * anything else of the form `owner/name`: a model on the Hugging Face Hub (downloaded once
    into the Hub's cache by `huggingface_hub`).

OUTPUT is a `.pth` file in gpt_train.py's checkpoint format (--to pth, the default), a
`.safetensors` file with GPTModel's tensor names and the config in its metadata (--to
safetensors), or a Hugging Face folder (`config.json` + `model.safetensors`, --to hf) that
`GPT2LMHeadModel.from_pretrained` loads. Writing OpenAI's TensorFlow format is left out on
purpose: nothing reads it any more but OpenAI's archived code.

Our state dicts are the book's: they include each attention layer's causal mask
(`trf_blocks.N.att.mask`), and the output head is its own matrix. The same functions serve
the notebooks and tests: `hf_to_gpt_state_dict` and `gpt_to_hf_state_dict` are each other's
inverse, so a model exported to Hugging Face and imported again is bit for bit the model
that went out.
"""

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from ch05_utils import (
    RunLock,
    config_from_state_dict,
    publish_atomic,
    read_model_state_dict,
    save_checkpoint_atomic,
)
from previous_chapters import GPTModel, load_weights_into_gpt

HF_WEIGHTS_NAME = "model.safetensors"
HF_CONFIG_NAME = "config.json"


class WeightFormatError(ValueError):
    """A weights file that does not fit the model: the message names the tensor and the fix."""


#####################################
# Configs
#####################################

def gpt_config_from_hf(hf_config: Mapping, qkv_bias: bool = True) -> dict:
    """Our GPTModel config from a Hugging Face GPT-2 `config.json` dict.

    Hugging Face's GPT-2 always has query/key/value biases; `qkv_bias` says whether our
    model should (False is exact when those biases are all zero, see `hf_to_gpt`).
    """
    if hf_config.get("model_type", "gpt2") != "gpt2":
        raise WeightFormatError(f"config.json describes a {hf_config['model_type']!r} model, not GPT-2.")
    if hf_config.get("activation_function", "gelu_new") != "gelu_new":
        raise WeightFormatError(
            f"config.json uses activation {hf_config['activation_function']!r}; GPTModel's GELU is "
            "the tanh approximation ('gelu_new'), so the logits would not match.")
    missing = [k for k in ("vocab_size", "n_positions", "n_embd", "n_head", "n_layer") if k not in hf_config]
    if missing:
        raise WeightFormatError(f"config.json lacks {', '.join(missing)}: it is not a GPT-2 config.")
    return {
        "vocab_size": hf_config["vocab_size"],
        "context_length": hf_config["n_positions"],
        "emb_dim": hf_config["n_embd"],
        "n_heads": hf_config["n_head"],
        "n_layers": hf_config["n_layer"],
        "drop_rate": hf_config.get("resid_pdrop", 0.1),
        "qkv_bias": qkv_bias,
    }


def hf_config_from_gpt(cfg: Mapping, tie_word_embeddings: bool) -> dict:
    """The `config.json` with which `GPT2LMHeadModel` rebuilds a GPTModel of config `cfg`.

    Written by hand, so exporting needs no `transformers`. The settings that GPTModel
    fixes in code are spelled out: tanh GELU ('gelu_new'), LayerNorm eps 1e-5, 4x MLP.
    """
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg["vocab_size"],
        "n_positions": cfg["context_length"],
        "n_embd": cfg["emb_dim"],
        "n_head": cfg["n_heads"],
        "n_layer": cfg["n_layers"],
        "n_inner": None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": cfg["drop_rate"],
        "embd_pdrop": cfg["drop_rate"],
        "attn_pdrop": cfg["drop_rate"],
        "scale_attn_weights": True,
        "tie_word_embeddings": tie_word_embeddings,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
        "dtype": "float32",
    }


def config_from_shapes(state_dict: Mapping[str, torch.Tensor], n_heads: int | None, source) -> dict:
    """`ch05_utils.config_from_state_dict`, with the file named in its error."""
    try:
        return config_from_state_dict(state_dict, n_heads)
    except ValueError as err:
        raise WeightFormatError(f"{source}: {err}") from None


#####################################
# State dicts
#####################################

def causal_mask(context_length: int) -> torch.Tensor:
    """The causal mask GPTModel keeps in its state dict, as the book's does: 1 above the diagonal."""
    return torch.triu(torch.ones(context_length, context_length), diagonal=1)


def is_mask(name: str) -> bool:
    return name.endswith(".att.mask")


def check_state_dict(state_dict: Mapping[str, torch.Tensor], model: torch.nn.Module) -> None:
    """Raise WeightFormatError naming the first tensor that is missing, unexpected, of the
    wrong shape, not floating point, or a mask that is not causal; `load_state_dict` would
    mix these into one long message. Missing masks are allowed (files saved before the
    masks were part of the state dict); the model's own are the same constants."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict and not is_mask(k)]
    unexpected = [k for k in state_dict if k not in expected]
    if missing:
        raise WeightFormatError(f"Missing tensor {missing[0]!r} ({len(missing)} missing in all). "
                                "Is this file a GPT-2 of the same number of layers?")
    if unexpected:
        raise WeightFormatError(f"Unexpected tensor {unexpected[0]!r} ({len(unexpected)} unexpected in all). "
                                "The file holds something the model has no place for.")
    for name, tensor in state_dict.items():
        if tensor.shape != expected[name].shape:
            raise WeightFormatError(f"Tensor {name!r} has shape {tuple(tensor.shape)}, the model expects "
                                    f"{tuple(expected[name].shape)}: the config does not match the weights.")
        if is_mask(name):
            if not torch.equal(tensor.bool(), expected[name].bool()):
                raise WeightFormatError(f"Tensor {name!r} is not a causal mask: the file is damaged.")
        elif not tensor.is_floating_point():
            raise WeightFormatError(f"Tensor {name!r} has dtype {tensor.dtype}; weights must be floating point.")


def strip_hf_prefix(hf_state_dict: Mapping[str, torch.Tensor]) -> dict:
    """Hugging Face's own GPT-2 files name tensors `h.0...`, files saved by `transformers`
    `transformer.h.0...`; accept both. `attn.bias`/`attn.masked_bias` are old causal-mask
    buffers that some files carry: our masks are made from the context length, so they
    are dropped."""
    out = {}
    for name, tensor in hf_state_dict.items():
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        out[name.removeprefix("transformer.")] = tensor
    return out


def hf_to_gpt_state_dict(hf_state_dict: Mapping[str, torch.Tensor], n_layers: int,
                         qkv_bias: bool = True) -> dict:
    """Translate a Hugging Face GPT-2 state dict into GPTModel's names and layouts.

    Two layout differences: Hugging Face stores its projections as `Conv1D` with weight
    shape (in, out), `nn.Linear` as (out, in), so every matrix is transposed; and it
    computes query, key and value with one `c_attn` matrix three times as wide, which is
    split into W_query, W_key and W_value. A missing `lm_head.weight` means the head is
    tied to the token embedding (GPT-2's original set-up): the head gets its own copy, as
    in the book. Each block's causal mask is added, so the result loads strictly into the
    book's GPTModel as well as ours.
    """
    sd = strip_hf_prefix(hf_state_dict)

    def take(name: str) -> torch.Tensor:
        if name not in sd:
            raise WeightFormatError(f"Missing tensor {name!r} in the Hugging Face weights.")
        return sd.pop(name)

    out = {"tok_emb.weight": take("wte.weight"), "pos_emb.weight": take("wpe.weight")}
    mask = causal_mask(out["pos_emb.weight"].shape[0])
    for i in range(n_layers):
        h, b = f"h.{i}.", f"trf_blocks.{i}."
        q_w, k_w, v_w = take(h + "attn.c_attn.weight").chunk(3, dim=-1)
        q_b, k_b, v_b = take(h + "attn.c_attn.bias").chunk(3, dim=-1)
        out[b + "att.mask"] = mask  # first, where the model's own state dict has it
        for ours, weight, bias in (("W_query", q_w, q_b), ("W_key", k_w, k_b), ("W_value", v_w, v_b)):
            out[b + f"att.{ours}.weight"] = weight.T.contiguous()
            if qkv_bias:
                out[b + f"att.{ours}.bias"] = bias.contiguous()
            elif torch.any(bias != 0):
                raise WeightFormatError(f"Tensor 'h.{i}.attn.c_attn.bias' is not zero, so the model needs "
                                        "qkv_bias=True.")
        pairs = (("attn.c_proj", "att.out_proj"), ("mlp.c_fc", "ff.layers.0"), ("mlp.c_proj", "ff.layers.2"))
        for theirs, ours in pairs:
            out[b + ours + ".weight"] = take(h + theirs + ".weight").T.contiguous()
            out[b + ours + ".bias"] = take(h + theirs + ".bias")
        for theirs, ours in (("ln_1", "norm1"), ("ln_2", "norm2")):
            out[b + ours + ".scale"] = take(h + theirs + ".weight")
            out[b + ours + ".shift"] = take(h + theirs + ".bias")
    out["final_norm.scale"] = take("ln_f.weight")
    out["final_norm.shift"] = take("ln_f.bias")
    out["out_head.weight"] = sd.pop("lm_head.weight", out["tok_emb.weight"])
    if sd:
        extra = sorted(sd)
        raise WeightFormatError(f"Unexpected tensor {extra[0]!r} in the Hugging Face weights "
                                f"({len(extra)} unexpected in all): does config.json give the right n_layer?")
    return out


def head_is_tied(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """True when the output head equals the token embedding: GPT-2's tying can then be kept."""
    return torch.equal(state_dict["out_head.weight"], state_dict["tok_emb.weight"])


def gpt_to_hf_state_dict(state_dict: Mapping[str, torch.Tensor], cfg: Mapping) -> dict:
    """The inverse of `hf_to_gpt_state_dict`, with the names `transformers` itself writes.

    A model without query/key/value biases gets zero biases (Hugging Face's GPT-2 always
    has them, and zeros change nothing). `lm_head.weight` is written only when the head
    differs from the token embedding; otherwise config.json says the two are tied. The
    causal masks are left out: Hugging Face's GPT-2 makes its own.
    """
    hf = {
        "transformer.wte.weight": state_dict["tok_emb.weight"],
        "transformer.wpe.weight": state_dict["pos_emb.weight"],
    }
    for i in range(cfg["n_layers"]):
        h, b = f"transformer.h.{i}.", f"trf_blocks.{i}."
        names = ("W_query", "W_key", "W_value")
        hf[h + "attn.c_attn.weight"] = torch.cat([state_dict[b + f"att.{n}.weight"].T for n in names], dim=1)
        if cfg["qkv_bias"]:
            hf[h + "attn.c_attn.bias"] = torch.cat([state_dict[b + f"att.{n}.bias"] for n in names])
        else:
            hf[h + "attn.c_attn.bias"] = state_dict[b + "att.W_query.weight"].new_zeros(3 * cfg["emb_dim"])
        pairs = (("attn.c_proj", "att.out_proj"), ("mlp.c_fc", "ff.layers.0"), ("mlp.c_proj", "ff.layers.2"))
        for theirs, ours in pairs:
            hf[h + theirs + ".weight"] = state_dict[b + ours + ".weight"].T
            hf[h + theirs + ".bias"] = state_dict[b + ours + ".bias"]
        for theirs, ours in (("ln_1", "norm1"), ("ln_2", "norm2")):
            hf[h + theirs + ".weight"] = state_dict[b + ours + ".scale"]
            hf[h + theirs + ".bias"] = state_dict[b + ours + ".shift"]
    hf["transformer.ln_f.weight"] = state_dict["final_norm.scale"]
    hf["transformer.ln_f.bias"] = state_dict["final_norm.shift"]
    if not head_is_tied(state_dict):
        hf["lm_head.weight"] = state_dict["out_head.weight"]
    return {name: tensor.contiguous() for name, tensor in hf.items()}


def c_attn_biases_are_zero(hf_state_dict: Mapping[str, torch.Tensor]) -> bool:
    """True when every query/key/value bias is exactly zero: then GPTModel with
    qkv_bias=False is the same function, which is what an exported qkv_bias=False model has."""
    biases = [t for name, t in hf_state_dict.items() if name.endswith("attn.c_attn.bias")]
    return bool(biases) and all(not torch.any(b) for b in biases)


def build_gpt(state_dict: Mapping[str, torch.Tensor], cfg: dict) -> GPTModel:
    """A GPTModel of config `cfg` holding `state_dict`, checked tensor by tensor first
    and then loaded strictly (a file without masks keeps the model's own)."""
    model = GPTModel(cfg)
    check_state_dict(state_dict, model)
    complete = {**{k: v for k, v in model.state_dict().items() if is_mask(k)}, **state_dict}
    model.load_state_dict(complete)
    return model.eval()


#####################################
# Reading files
#####################################

def read_safetensors(path: str | Path) -> dict:
    """All tensors of a `.safetensors` file, with a clear error for a damaged file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No safetensors file at {path}.")
    try:
        return load_file(path)
    except (SafetensorError, OSError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise WeightFormatError(f"{path} is not a complete safetensors file ({reason}). "
                                "It may be truncated: download or export it again.") from None


def read_json(path: Path) -> dict:
    """A JSON file, with an error that names it (a bare JSONDecodeError names no file)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise WeightFormatError(f"{path} is not valid JSON ({err}). It may be truncated: download it "
                                "again.") from None
    if not isinstance(data, dict):
        raise WeightFormatError(f"{path} holds no JSON object: it is not a model config.")
    return data


def resolve_hf_files(source: str | Path) -> tuple[Path, Path]:
    """(config.json, model.safetensors) of a local folder, or of a Hub repo id, downloaded
    once into the Hugging Face cache (~/.cache/huggingface, or $HF_HOME)."""
    folder = Path(source)
    if folder.is_dir():
        paths = folder / HF_CONFIG_NAME, folder / HF_WEIGHTS_NAME
        for path in paths:
            if not path.is_file():
                raise FileNotFoundError(f"{folder} has no {path.name}; a Hugging Face GPT-2 folder needs "
                                        f"{HF_CONFIG_NAME} and {HF_WEIGHTS_NAME}.")
        return paths
    from huggingface_hub import hf_hub_download

    paths = []
    for name in (HF_CONFIG_NAME, HF_WEIGHTS_NAME):
        try:
            paths.append(Path(hf_hub_download(str(source), name)))
        except Exception as err:  # offline, no such repo, gated...: huggingface_hub raises many kinds
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise WeightFormatError(f"Could not get {name} of {source} from the Hugging Face Hub ({reason}). "
                                    "Check the repo id and the connection, or give a local folder.") from None
    return paths[0], paths[1]


def load_hf(source: str | Path) -> tuple[dict, dict]:
    """(state_dict, config) for GPTModel from a Hugging Face GPT-2 folder or Hub repo id."""
    config_path, weights_path = resolve_hf_files(source)
    hf_config = read_json(config_path)
    hf_state_dict = read_safetensors(weights_path)
    qkv_bias = not c_attn_biases_are_zero(hf_state_dict)
    try:
        cfg = gpt_config_from_hf(hf_config, qkv_bias=qkv_bias)
    except WeightFormatError as err:
        raise WeightFormatError(f"{config_path}: {err}") from None
    return hf_to_gpt_state_dict(hf_state_dict, cfg["n_layers"], qkv_bias=qkv_bias), cfg


def load_safetensors_file(path: str | Path, n_heads: int | None = None) -> tuple[dict, dict]:
    """(state_dict, config) from a single `.safetensors` file: GPTModel's own tensor names
    (the config from the file's metadata, else from the shapes), or a Hugging Face GPT-2's
    (the config from the shapes)."""
    from safetensors import safe_open

    tensors = read_safetensors(path)
    if "tok_emb.weight" in tensors:
        with safe_open(path, framework="pt") as f:
            stored = (f.metadata() or {}).get("config")
        cfg = json.loads(stored) if stored else config_from_shapes(tensors, n_heads, path)
        return tensors, cfg
    hf = strip_hf_prefix(tensors)
    if "wte.weight" not in hf:
        raise WeightFormatError(f"{path} holds neither GPTModel's tensors (tok_emb.weight) nor a Hugging Face "
                                "GPT-2's (wte.weight): it is not a GPT-2.")
    qkv_bias = not c_attn_biases_are_zero(hf)
    n_layers = len({k.split(".")[1] for k in hf if k.startswith("h.")})
    state_dict = hf_to_gpt_state_dict(hf, n_layers, qkv_bias=qkv_bias)
    return state_dict, config_from_shapes(state_dict, n_heads, path)


def load_pth(path: str | Path, n_heads: int | None = None) -> tuple[dict, dict]:
    """(state_dict, config) from a `.pth` file: gpt_train.py's checkpoint.pth, the book's
    model.pth or model_and_optimizer.pth (config read off the shapes). The file is
    memory-mapped, so an optimizer state beside the weights is never read."""
    state_dict, cfg = read_model_state_dict(path)  # one-line errors for truncated or foreign files
    if cfg is None:
        cfg = config_from_shapes(state_dict, n_heads, path)
    return dict(state_dict), dict(cfg)


def load_openai(folder: str | Path) -> tuple[dict, dict]:
    """(state_dict, config) from OpenAI's TensorFlow checkpoint folder (hparams.json,
    checkpoint, model.ckpt.*), read with gpt_download's TensorFlow-free reader and put
    into the model with the book's `load_weights_into_gpt`."""
    from gpt_download import checkpoint_prefix, config_from_hparams, load_gpt2_params_numpy, read_hparams

    folder = Path(folder)
    settings = read_hparams(folder / "hparams.json")
    params = load_gpt2_params_numpy(checkpoint_prefix(folder), settings)
    cfg = config_from_hparams(settings)
    model = GPTModel(cfg)
    load_weights_into_gpt(model, params)
    return model.state_dict(), cfg


def detect_format(source: str) -> str:
    """'openai', 'hf', 'pth', 'safetensors' or 'hub' for a converter input (see the module docstring)."""
    path = Path(source)
    if path.is_dir():
        if (path / "hparams.json").is_file():
            return "openai"
        if (path / HF_CONFIG_NAME).is_file():
            return "hf"
        raise WeightFormatError(f"{path} holds neither OpenAI's checkpoint (hparams.json) nor a Hugging Face "
                                f"model ({HF_CONFIG_NAME}).")
    if path.suffix in (".pth", ".safetensors"):
        if not path.is_file():
            raise FileNotFoundError(f"No {path.suffix} file at {path}.")
        return path.suffix[1:]
    if path.exists():
        raise WeightFormatError(f"Do not know how to read {path}: give a .pth or .safetensors file or a model "
                                "folder.")
    if source.count("/") == 1 and not source.startswith((".", "/")):
        return "hub"
    raise FileNotFoundError(f"{source} does not exist (and is not a Hub repo id of the form owner/name).")


def load_any(source: str, n_heads: int | None = None) -> tuple[dict, dict]:
    """(state_dict, config) for GPTModel from any input the converter accepts."""
    fmt = detect_format(source)
    if fmt == "openai":
        return load_openai(source)
    if fmt == "pth":
        return load_pth(source, n_heads)
    if fmt == "safetensors":
        return load_safetensors_file(source, n_heads)
    return load_hf(source)


#####################################
# Writing files
#####################################

def unshared(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """Contiguous tensors, each with its own memory: safetensors refuses tensors that share
    memory (a head tied to the embedding, or one mask used by every block)."""
    seen, out = set(), {}
    for name, tensor in state_dict.items():
        tensor = tensor.contiguous()
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        out[name] = tensor.clone() if key in seen else tensor
        seen.add(key)
    return out


def save_safetensors(state_dict: Mapping[str, torch.Tensor], cfg: Mapping, path: str | Path) -> Path:
    """GPTModel's state dict as one `.safetensors` file (the course's Hub format: our names,
    masks included), with the config as JSON in the metadata; written atomically."""
    from safetensors.torch import save_file

    tensors = unshared(state_dict)
    return publish_atomic(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt",
                                                                               "config": json.dumps(dict(cfg))}))


def save_hf(state_dict: Mapping[str, torch.Tensor], cfg: Mapping, folder: str | Path) -> bool:
    """Write `config.json` + `model.safetensors` for `GPT2LMHeadModel.from_pretrained`.

    A new folder is written complete under a temporary name and then renamed, so an
    interrupted export never leaves a folder that looks finished; in an existing folder
    each file is replaced atomically. Returns whether the export ties the output head to
    the token embedding (only when the two are equal).
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    hf_state_dict = unshared(gpt_to_hf_state_dict(state_dict, cfg))
    tied = "lm_head.weight" not in hf_state_dict
    target = folder if folder.is_dir() else Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        publish_atomic(target / HF_WEIGHTS_NAME,
                       lambda tmp: save_file(hf_state_dict, tmp, metadata={"format": "pt"}))
        config = json.dumps(hf_config_from_gpt(cfg, tie_word_embeddings=tied), indent=2)
        publish_atomic(target / HF_CONFIG_NAME, lambda tmp: tmp.write_text(config))
        if target != folder:
            os.replace(target, folder)
    except BaseException:
        if target != folder:
            shutil.rmtree(target, ignore_errors=True)  # the temporary folder this function made
        raise
    return tied


#####################################
# Command line
#####################################

def max_logit_difference_with_transformers(model: GPTModel, hf_folder: Path) -> float:
    """Largest |logit difference| between our model and `GPT2LMHeadModel` loaded from the export."""
    from transformers import GPT2LMHeadModel

    hf_model = GPT2LMHeadModel.from_pretrained(hf_folder).eval()
    torch.manual_seed(0)
    idx = torch.randint(0, model.tok_emb.num_embeddings, (2, min(16, model.pos_emb.num_embeddings)))
    with torch.no_grad():
        return (model(idx) - hf_model(idx).logits).abs().max().item()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="OpenAI checkpoint folder, Hugging Face folder or Hub id, .pth or "
                                      ".safetensors file.")
    parser.add_argument("output", type=Path, help="Output .pth file (--to pth), .safetensors file "
                                                  "(--to safetensors) or folder (--to hf).")
    parser.add_argument("--to", choices=("pth", "safetensors", "hf"), default="pth", help="Output format.")
    parser.add_argument("--n-heads", type=int, default=None,
                        help="Attention heads, for a file without a config whose width is not one of GPT-2's.")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing output.")
    parser.add_argument("--verify", action="store_true",
                        help="After --to hf, load the export with transformers and print the largest logit "
                             "difference to our model.")
    return parser


def check_output(args: argparse.Namespace) -> None:
    """Refuse an output that cannot or should not be written, before reading any weights."""
    out = args.output
    if args.to in ("pth", "safetensors") and out.suffix != f".{args.to}":
        raise ValueError(f"with --to {args.to} the output must be a .{args.to} file, got {out}.")
    if args.to == "hf" and out.suffix:
        raise ValueError(f"with --to hf the output is a folder; drop the suffix of {out}.")
    if args.to == "hf" and out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file; with --to hf the output is a folder.")
    if args.to != "hf" and out.is_dir():
        raise ValueError(f"{out} is a folder; give a file name.")
    if out.exists() and not args.overwrite:
        raise ValueError(f"{out} exists; pass --overwrite to replace it, or choose another output.")
    if not out.parent.is_dir() or not os.access(out.parent, os.W_OK):
        raise ValueError(f"cannot write {out}: its folder {out.parent} does not exist or is not writable.")
    if args.n_heads is not None and args.n_heads < 1:
        raise ValueError(f"--n-heads must be a positive number, got {args.n_heads}.")


def write_output(model: GPTModel, cfg: dict, args: argparse.Namespace) -> None:
    """Write the converted model in the chosen format and say what was written."""
    state_dict = model.state_dict()
    if args.to == "pth":
        save_checkpoint_atomic({"model": state_dict, "config": cfg}, args.output)
    elif args.to == "safetensors":
        save_safetensors(state_dict, cfg, args.output)
    else:
        tied = save_hf(state_dict, cfg, args.output)
        if tied:
            print("The output head equals the token embedding, so the export ties them, as GPT-2 does "
                  "(tie_word_embeddings: true).")
        else:
            print("The output head differs from the token embedding (it was trained on its own), so the "
                  "export keeps it as lm_head.weight with tie_word_embeddings: false; transformers loads "
                  "it untied, with the same logits.")
    print(f"Wrote {args.output}.")


def convert(args: argparse.Namespace) -> None:
    state_dict, cfg = load_any(args.input, args.n_heads)
    model = build_gpt(state_dict, cfg)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"Read {args.input}: {n_params / 1e6:.1f}M parameters, config {cfg}.")
    write_output(model, cfg, args)
    if args.verify and args.to == "hf":
        diff = max_logit_difference_with_transformers(model, args.output)
        print(f"GPT2LMHeadModel.from_pretrained({str(args.output)!r}) vs GPTModel: max |logit difference| = "
              f"{diff:.2e}")


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)  # SIGTERM cleans up like Ctrl-C
    try:
        check_output(args)
        with RunLock(args.output.parent, f".{args.output.name}.convert.lock") as lock:  # one run per output
            try:
                convert(args)
            finally:
                lock.path.unlink(missing_ok=True)  # our own lock file, removed while we still hold it
    except (ValueError, OSError, RuntimeError) as err:  # WeightFormatError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"Interrupted: {args.output} was not written (or is unchanged).", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
