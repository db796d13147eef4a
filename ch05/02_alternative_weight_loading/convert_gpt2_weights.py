"""Convert GPT-2 weights between OpenAI's checkpoint, Hugging Face and the chapter's GPTModel.

    python convert_gpt2_weights.py gpt2/124M model-124M.pth                 # OpenAI -> our .pth
    python convert_gpt2_weights.py gpt2/124M gpt2-124M-hf --to hf           # OpenAI -> Hugging Face
    python convert_gpt2_weights.py openai-community/gpt2 gpt2.pth           # Hugging Face Hub -> our .pth
    python convert_gpt2_weights.py ../01_main-chapter-code/output/checkpoint.pth my-gpt --to hf --verify

INPUT is recognized by what it is:
  * a folder with `hparams.json` and `model.ckpt.*`: OpenAI's TensorFlow checkpoint;
  * a folder with `config.json` and `model.safetensors`: a Hugging Face GPT-2;
  * a `.pth` file: a `gpt_train.py` checkpoint (or any {"model": state_dict, "config": cfg} file),
    or a bare state dict of our GPTModel (the config is then read off the tensor shapes);
  * anything else of the form `owner/name`: a model on the Hugging Face Hub (downloaded once
    into the Hub's cache by `huggingface_hub`).

OUTPUT is a `.pth` file in `gpt_train.py`'s checkpoint format (--to pth, the default) or a
Hugging Face folder (`config.json` + `model.safetensors`, --to hf) that
`GPT2LMHeadModel.from_pretrained` loads. Writing OpenAI's TensorFlow format is left out on
purpose: nothing reads it any more but OpenAI's archived code.

The same functions serve the notebooks and tests: `hf_to_gpt_state_dict`,
`gpt_to_hf_state_dict` and the config translations are each other's inverse, so a model
exported to Hugging Face and imported again is bit-for-bit the model that went out.
"""

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from ch05_utils import save_checkpoint_atomic
from previous_chapters import GPTModel

# GPT-2's four sizes have these head counts; a bare state dict does not record them.
GPT2_HEADS_BY_EMB_DIM = {768: 12, 1024: 16, 1280: 20, 1600: 25}
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


def infer_gpt_config(state_dict: Mapping[str, torch.Tensor], n_heads: int | None = None,
                     drop_rate: float = 0.1) -> dict:
    """Read a GPTModel config off the shapes of its state dict.

    Shapes give everything but the number of heads: that is taken from `n_heads`, or
    from GPT-2's own sizes when the embedding width is one of them.
    """
    for name in ("tok_emb.weight", "pos_emb.weight"):
        if name not in state_dict:
            raise WeightFormatError(f"Not a GPTModel state dict: it has no {name!r} tensor.")
    vocab_size, emb_dim = state_dict["tok_emb.weight"].shape
    n_layers = len({key.split(".")[1] for key in state_dict if key.startswith("trf_blocks.")})
    if n_heads is None:
        if emb_dim not in GPT2_HEADS_BY_EMB_DIM:
            raise WeightFormatError(
                f"Cannot tell the number of attention heads of a model with emb_dim={emb_dim}; "
                "pass it with --n-heads.")
        n_heads = GPT2_HEADS_BY_EMB_DIM[emb_dim]
    return {
        "vocab_size": vocab_size,
        "context_length": state_dict["pos_emb.weight"].shape[0],
        "emb_dim": emb_dim,
        "n_heads": n_heads,
        "n_layers": n_layers,
        "drop_rate": drop_rate,
        "qkv_bias": "trf_blocks.0.att.W_query.bias" in state_dict,
    }


#####################################
# State dicts
#####################################

def check_state_dict(state_dict: Mapping[str, torch.Tensor], model: torch.nn.Module) -> None:
    """Raise WeightFormatError naming the first tensor that is missing, unexpected, of the
    wrong shape or not floating point; `load_state_dict` would mix these into one long message."""
    expected = model.state_dict()  # persistent entries only: the causal masks are rebuilt by the model
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing:
        raise WeightFormatError(f"Missing tensor {missing[0]!r} ({len(missing)} missing in all). "
                                "Is this file a GPT-2 of the same number of layers?")
    if unexpected:
        raise WeightFormatError(f"Unexpected tensor {unexpected[0]!r} ({len(unexpected)} unexpected in all). "
                                "The file holds something the model has no place for.")
    for name, tensor in state_dict.items():
        if not tensor.is_floating_point():
            raise WeightFormatError(f"Tensor {name!r} has dtype {tensor.dtype}; weights must be floating point.")
        if tensor.shape != expected[name].shape:
            raise WeightFormatError(f"Tensor {name!r} has shape {tuple(tensor.shape)}, the model expects "
                                    f"{tuple(expected[name].shape)}: the config does not match the weights.")


def strip_hf_prefix(hf_state_dict: Mapping[str, torch.Tensor]) -> dict:
    """Hugging Face's own GPT-2 files name tensors `h.0...`, files saved by `transformers`
    `transformer.h.0...`; accept both. `attn.bias`/`attn.masked_bias` are old causal-mask
    buffers that some files carry: masks are rebuilt by the model, so they are dropped."""
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
    tied to the token embedding (GPT-2's original set-up), so that is copied.
    """
    sd = strip_hf_prefix(hf_state_dict)

    def take(name: str) -> torch.Tensor:
        if name not in sd:
            raise WeightFormatError(f"Missing tensor {name!r} in the Hugging Face weights.")
        return sd.pop(name)

    out = {
        "tok_emb.weight": take("wte.weight"),
        "pos_emb.weight": take("wpe.weight"),
    }
    for i in range(n_layers):
        h, b = f"h.{i}.", f"trf_blocks.{i}."
        q_w, k_w, v_w = take(h + "attn.c_attn.weight").chunk(3, dim=-1)
        q_b, k_b, v_b = take(h + "attn.c_attn.bias").chunk(3, dim=-1)
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


def gpt_to_hf_state_dict(state_dict: Mapping[str, torch.Tensor], cfg: Mapping) -> dict:
    """The inverse of `hf_to_gpt_state_dict`, with the names `transformers` itself writes.

    A model without query/key/value biases gets zero biases (Hugging Face's GPT-2 always
    has them, and zeros change nothing). `lm_head.weight` is written only when the head
    differs from the token embedding; otherwise config.json says the two are tied.
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
    if not torch.equal(state_dict["out_head.weight"], state_dict["tok_emb.weight"]):
        hf["lm_head.weight"] = state_dict["out_head.weight"]
    return {name: tensor.contiguous() for name, tensor in hf.items()}


def c_attn_biases_are_zero(hf_state_dict: Mapping[str, torch.Tensor]) -> bool:
    """True when every query/key/value bias is exactly zero: then GPTModel with
    qkv_bias=False is the same function, which is what an exported qkv_bias=False model has."""
    biases = [t for name, t in hf_state_dict.items() if name.endswith("attn.c_attn.bias")]
    return bool(biases) and all(not torch.any(b) for b in biases)


def build_gpt(state_dict: Mapping[str, torch.Tensor], cfg: dict) -> GPTModel:
    """A GPTModel of config `cfg` holding `state_dict`, checked tensor by tensor first."""
    model = GPTModel(cfg)
    check_state_dict(state_dict, model)
    model.load_state_dict(state_dict)
    return model.eval()


#####################################
# Files
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
    except SafetensorError as err:
        raise WeightFormatError(f"{path} is not a complete safetensors file ({err}). "
                                "It may be truncated: download or export it again.") from None


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

    return (Path(hf_hub_download(str(source), HF_CONFIG_NAME)),
            Path(hf_hub_download(str(source), HF_WEIGHTS_NAME)))


def load_hf(source: str | Path) -> tuple[dict, dict]:
    """(state_dict, config) for GPTModel from a Hugging Face GPT-2 folder or Hub repo id."""
    config_path, weights_path = resolve_hf_files(source)
    hf_config = json.loads(config_path.read_text())
    hf_state_dict = read_safetensors(weights_path)
    qkv_bias = not c_attn_biases_are_zero(hf_state_dict)
    cfg = gpt_config_from_hf(hf_config, qkv_bias=qkv_bias)
    return hf_to_gpt_state_dict(hf_state_dict, cfg["n_layers"], qkv_bias=qkv_bias), cfg


def save_hf(state_dict: Mapping[str, torch.Tensor], cfg: Mapping, folder: str | Path) -> Path:
    """Write `config.json` + `model.safetensors` for `GPT2LMHeadModel.from_pretrained`.

    Each file goes to a temporary name first and is renamed when complete, so an
    interrupted export never leaves a folder that looks finished.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hf_state_dict = gpt_to_hf_state_dict(state_dict, cfg)
    tied = "lm_head.weight" not in hf_state_dict
    tmp_weights = folder / (HF_WEIGHTS_NAME + ".tmp")
    save_file(hf_state_dict, tmp_weights, metadata={"format": "pt"})
    os.replace(tmp_weights, folder / HF_WEIGHTS_NAME)
    fd, tmp_config = tempfile.mkstemp(dir=folder, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(hf_config_from_gpt(cfg, tie_word_embeddings=tied), f, indent=2)
    os.replace(tmp_config, folder / HF_CONFIG_NAME)
    return folder


def load_pth(path: str | Path, n_heads: int | None = None) -> tuple[dict, dict]:
    """(state_dict, config) from a `.pth` file: a gpt_train.py checkpoint, a
    {"model", "config"} file, or a bare state dict (config read off the shapes).

    Older versions of the course saved the causal masks (`...att.mask`) with the
    weights; they are dropped, since the model builds its own.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No .pth file at {path}.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many kinds here (zip, pickle, EOF)
        raise WeightFormatError(f"Could not read {path} with torch.load(weights_only=True): {err}") from None
    if isinstance(obj, dict) and "model" in obj and "config" in obj:
        state_dict, cfg = obj["model"], dict(obj["config"])
    elif isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state_dict = obj
        cfg = infer_gpt_config({k: v for k, v in obj.items() if not k.endswith(".att.mask")}, n_heads)
    else:
        raise WeightFormatError(f"{path} holds neither a GPTModel state dict nor a checkpoint with "
                                "'model' and 'config' entries.")
    state_dict = {k: v for k, v in state_dict.items() if not k.endswith(".att.mask")}
    return state_dict, cfg


def load_openai(folder: str | Path) -> tuple[dict, dict]:
    """(state_dict, config) from OpenAI's TensorFlow checkpoint folder (hparams.json,
    checkpoint, model.ckpt.*), read with gpt_download's TensorFlow-free reader."""
    from gpt_download import (
        checkpoint_prefix,
        config_from_hparams,
        load_gpt2_params_numpy,
        load_weights_into_gpt,
        read_hparams,
    )

    folder = Path(folder)
    settings = read_hparams(folder / "hparams.json")
    params = load_gpt2_params_numpy(checkpoint_prefix(folder), settings)
    cfg = config_from_hparams(settings)
    model = GPTModel(cfg)
    load_weights_into_gpt(model, params)
    return model.state_dict(), cfg


def detect_format(source: str) -> str:
    """'openai', 'hf', 'pth' or 'hub' for a converter input (see the module docstring)."""
    path = Path(source)
    if path.is_dir():
        if (path / "hparams.json").is_file():
            return "openai"
        if (path / HF_CONFIG_NAME).is_file():
            return "hf"
        raise WeightFormatError(f"{path} holds neither OpenAI's checkpoint (hparams.json) nor a Hugging Face "
                                f"model ({HF_CONFIG_NAME}).")
    if path.suffix == ".pth":
        if not path.is_file():
            raise FileNotFoundError(f"No .pth file at {path}.")
        return "pth"
    if path.exists():
        raise WeightFormatError(f"Do not know how to read {path}: give a .pth file or a model folder.")
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
    return load_hf(source)


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
    parser.add_argument("input", help="OpenAI checkpoint folder, Hugging Face folder or Hub id, or .pth file.")
    parser.add_argument("output", type=Path, help="Output .pth file (--to pth) or folder (--to hf).")
    parser.add_argument("--to", choices=("pth", "hf"), default="pth", help="Output format.")
    parser.add_argument("--n-heads", type=int, default=None,
                        help="Attention heads, for a bare state dict whose width is not one of GPT-2's.")
    parser.add_argument("--verify", action="store_true",
                        help="After --to hf, load the export with transformers and print the largest logit "
                             "difference to our model.")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.to == "pth" and args.output.suffix != ".pth":
        print(f"error: with --to pth the output must be a .pth file, got {args.output}.", file=sys.stderr)
        return 2
    if args.to == "hf" and args.output.suffix:
        print(f"error: with --to hf the output is a folder; drop the suffix of {args.output}.", file=sys.stderr)
        return 2
    try:
        state_dict, cfg = load_any(args.input, args.n_heads)
        model = build_gpt(state_dict, cfg)
    except (ValueError, FileNotFoundError) as err:  # WeightFormatError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 2
    n_params = sum(t.numel() for t in state_dict.values())
    print(f"Read {args.input}: {n_params / 1e6:.1f}M parameters, config {cfg}.")
    if args.to == "pth":
        save_checkpoint_atomic({"model": model.state_dict(), "config": cfg}, args.output)
    else:
        save_hf(model.state_dict(), cfg, args.output)
    print(f"Wrote {args.output}.")
    if args.verify and args.to == "hf":
        diff = max_logit_difference_with_transformers(model, args.output)
        print(f"GPT2LMHeadModel.from_pretrained({str(args.output)!r}) vs GPTModel: max |logit difference| = "
              f"{diff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
