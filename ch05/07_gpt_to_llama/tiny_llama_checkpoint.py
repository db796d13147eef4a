"""Tiny random stand-ins for Meta's gated Llama files, for tests and offline runs.

Meta's weights and tokenizers need a Hugging Face account and a license click, so
CI (and anyone offline) cannot download them. These functions write files with the
same layout instead: a Hugging Face checkpoint folder (config.json and safetensors
shards) and Meta's original Llama 2 layout (consolidated.00.pth), both made from
`transformers`' own `LlamaForCausalLM`, a tiktoken ranks file for the Llama 3
tokenizer learned from a little text, and a sentencepiece model for Llama 2. The
notebooks' weight-loading cells then run the real code paths on them
(llama_stand_in.py), and the tests compare the results with `transformers`.
"""

import base64
import json
from collections import Counter
from pathlib import Path

import torch
from llama3 import LLAMA3_SPECIAL_TOKENS, LLAMA3_SPLIT_PATTERN, checkpoint_names

# The sizes of every tiny stand-in model (transformers' names); the notebooks' CI mode
# shrinks the book's configs to the same sizes (llama_stand_in.py).
TINY_DIMS = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 8}

SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog. A large language model predicts the next token.\n"
    "Llamas are domesticated South American camelids, widely used as meat and pack animals.\n"
    "What do llamas eat? Llamas eat grass, hay and other plants. They are herbivores.\n"
) * 4


def train_byte_bpe(text: str, n_merges: int) -> dict[bytes, int]:
    """Byte-level BPE ranks: the 256 single bytes, then the `n_merges` most frequent pair merges.

    Text is pre-split with Llama 3's pattern, as tiktoken does before merging, so merges
    never cross word boundaries.
    """
    import regex

    ranks = {bytes([b]): b for b in range(256)}
    words = Counter(regex.findall(LLAMA3_SPLIT_PATTERN, text))
    pieces = {word: [bytes([b]) for b in word.encode("utf-8")] for word in words}
    for _ in range(n_merges):
        pairs = Counter()
        for word, count in words.items():
            seq = pieces[word]
            for pair in zip(seq, seq[1:], strict=False):
                pairs[pair] += count
        if not pairs:
            break
        (a, b), _ = pairs.most_common(1)[0]
        ranks.setdefault(a + b, len(ranks))
        for word, seq in pieces.items():
            merged, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and seq[i] == a and seq[i + 1] == b:
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(seq[i])
                    i += 1
            pieces[word] = merged
    return ranks


def write_tiktoken_ranks(ranks: dict[bytes, int], path: str | Path) -> Path:
    """Write ranks in tiktoken's `base64(token) rank` format, the format of Llama 3's tokenizer.model."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"{base64.b64encode(token).decode()} {rank}" for token, rank in sorted(ranks.items(), key=lambda x: x[1])]
    path.write_text("\n".join(lines) + "\n")
    return path


def train_tiny_sentencepiece(text: str, folder: str | Path, vocab_size: int = 300) -> Path:
    """A small BPE sentencepiece model with Llama 2's settings.

    Like Meta's: byte fallback (no character is ever unknown), <unk>=0, <s>=1, </s>=2,
    digits split, and no text normalization, so decoding gives back the exact input.
    """
    import sentencepiece as spm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.txt"
    corpus.write_text(text)
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "tokenizer"), vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0,
        split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        minloglevel=2)
    return folder / "tokenizer.model"


def hf_llama_config(version: str, vocab_size: int, context_length: int = 128):
    """A tiny `transformers.LlamaConfig` with the features of Llama `version` ("2", "3", "3.1" or "3.2")."""
    from transformers import LlamaConfig

    dims = {**TINY_DIMS, "max_position_embeddings": context_length}
    # rope_theta / rope_scaling: the keys of transformers 4.x, which 5.x still accepts.
    rope_theta = 10_000.0 if version == "2" else 500_000.0
    rope_scaling = None
    if version in ("3.1", "3.2"):
        # Llama 3.1/3.2 scaling with a small "original context" so the tiny model's positions reach it.
        rope_scaling = {"rope_type": "llama3", "factor": 8.0 if version == "3.1" else 32.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    return LlamaConfig(
        vocab_size=vocab_size, **dims,
        num_key_value_heads=dims["num_attention_heads"] if version == "2" else dims["num_attention_heads"] // 4,
        rms_norm_eps=1e-5, rope_theta=rope_theta, rope_scaling=rope_scaling, tie_word_embeddings=version == "3.2",
        bos_token_id=None, eos_token_id=None, pad_token_id=None)


def make_tiny_llama3_checkpoint(folder: str | Path, version: str = "3.2", n_merges: int = 200, seed: int = 123,
                                *, context_length: int = 128, n_shards: int = 1) -> Path:
    """Write a random Llama `version` checkpoint folder laid out like Meta's Hugging Face repositories.

    Contents: config.json, the weights (model.safetensors, or `n_shards` files
    model-00001-of-0000N.safetensors with their index, as the 8B models come) and
    original/tokenizer.model (tiktoken ranks learned from SAMPLE_TEXT). The vocabulary
    is the ranks plus Llama 3's 256 special tokens, as in the real 128,256.
    """
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    folder = Path(folder)
    ranks = train_byte_bpe(SAMPLE_TEXT, n_merges)
    write_tiktoken_ranks(ranks, folder / "original" / "tokenizer.model")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(hf_llama_config(version, len(ranks) + len(LLAMA3_SPECIAL_TOKENS), context_length))
    if n_shards == 1:
        model.save_pretrained(folder, safe_serialization=True)
        return folder
    model.config.to_json_file(folder / "config.json")
    state = {name: t.detach().clone().contiguous() for name, t in model.state_dict().items()
             if not (name == "lm_head.weight" and model.config.tie_word_embeddings)}
    names = list(state)
    weight_map = {}
    for i in range(n_shards):
        shard = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        part = names[i * len(names) // n_shards:(i + 1) * len(names) // n_shards]
        save_file({name: state[name] for name in part}, str(folder / shard))
        weight_map.update(dict.fromkeys(part, shard))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


def hf_to_meta_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of llama3.permute: Hugging Face's "rotate half" q/k rows back to Meta's neighbour pairs."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, 2, out_dim // n_heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def meta_state_dict(hf_model) -> dict[str, torch.Tensor]:
    """A transformers Llama's weights under Meta's original names and q/k layout (consolidated.00.pth)."""
    cfg = hf_model.config
    hf_state = hf_model.state_dict()
    hf_names = checkpoint_names(cfg.num_hidden_layers, "hf")
    meta_names = checkpoint_names(cfg.num_hidden_layers, "meta")
    state = {}
    for ours, meta_name in meta_names.items():
        tensor = hf_state[hf_names[ours]].clone()
        if ours.endswith("W_query.weight"):
            tensor = hf_to_meta_qk(tensor, cfg.num_attention_heads)
        elif ours.endswith("W_key.weight"):
            tensor = hf_to_meta_qk(tensor, cfg.num_key_value_heads)
        state[meta_name] = tensor
    return state


def make_tiny_meta_llama2_checkpoint(folder: str | Path, seed: int = 123):
    """A random Llama 2 in Meta's original download layout: consolidated.00.pth, params.json, tokenizer.model.

    This is the layout the book's Llama 2 notebook loads (meta-llama/Llama-2-7b). Returns
    (folder, the transformers model it was converted from), so tests can check that
    loading it reproduces that model's logits.
    """
    import sentencepiece as spm
    from transformers import LlamaForCausalLM

    folder = Path(folder)
    tokenizer_path = train_tiny_sentencepiece(SAMPLE_TEXT, folder / "spm")
    (folder / "tokenizer.model").write_bytes(tokenizer_path.read_bytes())
    vocab_size = spm.SentencePieceProcessor(model_file=str(tokenizer_path)).get_piece_size()
    torch.manual_seed(seed)
    hf_model = LlamaForCausalLM(hf_llama_config("2", vocab_size)).eval()
    torch.save(meta_state_dict(hf_model), folder / "consolidated.00.pth")
    cfg = hf_model.config
    (folder / "params.json").write_text(json.dumps({
        "dim": cfg.hidden_size, "n_heads": cfg.num_attention_heads, "n_layers": cfg.num_hidden_layers,
        "norm_eps": cfg.rms_norm_eps, "vocab_size": vocab_size}))
    return folder, hf_model
