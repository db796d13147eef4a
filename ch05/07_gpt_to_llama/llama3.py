"""Meta's Llama 3.2 (and Llama 3, 3.1 and 2) in one importable file.

The model is the chapter's GPT with the changes that `converting-gpt-to-llama2.ipynb`
and `converting-llama2-to-llama3.ipynb` walk through: RMSNorm instead of LayerNorm, a
gated SiLU feed-forward (SwiGLU), rotary position embeddings (RoPE, with Llama 3.1's
frequency scaling), grouped-query attention, no biases and no dropout.
`standalone-llama32.ipynb` writes the same model in its own cells; a test checks that
the notebook's definitions and this file compute the same.

The book's names and signatures work here as in the book (`Llama3Model`,
`GroupedQueryAttention(d_in, d_out, num_heads, num_kv_groups, dtype=None)` with
`forward(x, mask, cos, sin)`, `compute_rope_params`, `apply_rope`, `Tokenizer`,
`ChatFormat`, `load_weights_into_llama(model, param_config, params)`, `generate`,
`clean_text`, ...). What this file adds sits beside them as keyword-only options:

* a key-value cache (`generate(..., use_cache=True)`), so each new token costs one
  position instead of re-reading the whole text;
* `torch.nn.functional.scaled_dot_product_attention` (`Llama3ModelFast`, or the config
  key "attn_impl"), which picks FlashAttention or other fused kernels where it can;
* loading Hugging Face safetensors tensor by tensor into a model built on the "meta"
  device (`load_llama_checkpoint`), so peak memory stays near one copy of the weights,
  with one clear error for a missing, truncated or foreign file.

Llama 2 is the special case n_kv_groups == n_heads, rope_base 10,000, no RoPE scaling.
Only torch (plus tiktoken / sentencepiece for the tokenizers and huggingface_hub for
downloads) is needed; `transformers` is used by the tests only, to prove that this
code computes the same logits.
"""

import base64
import json
import math
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from previous_chapters import generate as chapter_generate

LLAMA2_CONFIG_7B = {
    "vocab_size": 32_000,        # sentencepiece vocabulary
    "context_length": 4096,
    "emb_dim": 4096,
    "n_heads": 32,
    "n_layers": 32,
    "hidden_dim": 11_008,        # feed-forward width
    "n_kv_groups": 32,           # key-value heads: as many as query heads = plain multi-head attention
    "rope_base": 10_000.0,
    "rope_freq": None,           # no RoPE frequency scaling
    "rms_norm_eps": 1e-5,
    "tie_embeddings": False,
    "dtype": torch.bfloat16,
}

LLAMA3_CONFIG_8B = {
    "vocab_size": 128_256,       # 128,000 BPE tokens + 256 special tokens
    "context_length": 8192,
    "emb_dim": 4096,
    "n_heads": 32,
    "n_layers": 32,
    "hidden_dim": 14_336,
    "n_kv_groups": 8,            # 8 key-value heads shared by 32 query heads (4 each)
    "rope_base": 500_000.0,
    "rope_freq": None,
    "rms_norm_eps": 1e-5,
    "tie_embeddings": False,
    "dtype": torch.bfloat16,
}

LLAMA31_CONFIG_8B = {
    **LLAMA3_CONFIG_8B,
    "context_length": 131_072,
    "rope_freq": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_context_length": 8192},
}

LLAMA32_CONFIG_1B = {
    "vocab_size": 128_256,
    "context_length": 131_072,
    "emb_dim": 2048,
    "n_heads": 32,
    "n_layers": 16,
    "hidden_dim": 8192,
    "n_kv_groups": 8,
    "rope_base": 500_000.0,
    "rope_freq": {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_context_length": 8192},
    "rms_norm_eps": 1e-5,
    "tie_embeddings": True,      # the output head reuses the token embedding matrix
    "dtype": torch.bfloat16,
}

LLAMA32_CONFIG_3B = {**LLAMA32_CONFIG_1B, "emb_dim": 3072, "n_heads": 24, "n_layers": 28}

CONFIG_KEYS = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "hidden_dim", "n_kv_groups",
               "rope_base", "rope_freq", "dtype")
# Keys the book's configs do not have, with the values the book's code uses: RMSNorm's
# eps of 1e-5, an output head of its own (tied only when a checkpoint has none), and
# attention written out by hand.
CONFIG_DEFAULTS = {"rms_norm_eps": 1e-5, "tie_embeddings": False, "attn_impl": "manual"}
ROPE_FREQ_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_context_length")


def check_config(cfg: dict) -> dict:
    """The config with the book's defaults filled in; a config the model cannot be built from fails here,
    naming the key, instead of deep inside a layer."""
    missing = [key for key in CONFIG_KEYS if key not in cfg]
    if missing:
        raise ValueError(f"Config lacks {missing}; start from a full config such as LLAMA32_CONFIG_1B.")
    cfg = {**CONFIG_DEFAULTS, **cfg}
    for key in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "hidden_dim", "n_kv_groups"):
        if isinstance(cfg[key], bool) or not isinstance(cfg[key], int) or cfg[key] < 1:
            raise ValueError(f"Config key {key!r} must be a positive integer, got {cfg[key]!r}.")
    if cfg["emb_dim"] % cfg["n_heads"]:
        raise ValueError(f"emb_dim ({cfg['emb_dim']}) must be divisible by n_heads ({cfg['n_heads']}).")
    if (cfg["emb_dim"] // cfg["n_heads"]) % 2:
        raise ValueError("emb_dim / n_heads must be even: RoPE rotates pairs of features.")
    if cfg["n_heads"] % cfg["n_kv_groups"]:
        raise ValueError(f"n_heads ({cfg['n_heads']}) must be divisible by n_kv_groups ({cfg['n_kv_groups']}).")
    if cfg["rope_freq"] is not None and sorted(cfg["rope_freq"]) != sorted(ROPE_FREQ_KEYS):
        raise ValueError(f"rope_freq must be None or a dict with exactly the keys {list(ROPE_FREQ_KEYS)}, "
                         f"got {sorted(cfg['rope_freq'])}.")
    if cfg["attn_impl"] not in ("manual", "sdpa"):
        raise ValueError(f"attn_impl must be 'manual' or 'sdpa', got {cfg['attn_impl']!r}.")
    return cfg


#####################################
# Rotary position embeddings
#####################################

def scale_rope_frequencies(inv_freq: torch.Tensor, factor: float, low_freq_factor: float, high_freq_factor: float,
                           original_context_length: int) -> torch.Tensor:
    """Llama 3.1's RoPE scaling: stretch slow rotations so 8k-token training covers 128k tokens.

    A frequency whose wavelength (tokens per full turn) is short compared with the
    original context has been seen through many turns in training: it is kept. One whose
    wavelength exceeds the original context never completed a turn: it is divided by
    `factor`, so positions up to factor x longer map onto angles seen in training. In
    between, the two are blended linearly in (context / wavelength); the clamp turns the
    blend weight into 0 or 1 outside that band, which gives the book's three cases.
    """
    wavelength = 2 * math.pi / inv_freq
    turns = original_context_length / wavelength  # full turns within the original context
    blend = ((turns - low_freq_factor) / (high_freq_factor - low_freq_factor)).clamp(0.0, 1.0)
    return (1 - blend) * (inv_freq / factor) + blend * inv_freq


def compute_rope_params(head_dim: int, theta_base: float = 10_000, context_length: int = 4096,
                        freq_config: dict | None = None,
                        dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every (position, feature) rotation angle, shape (context_length, head_dim).

    Feature pair i (features i and i + head_dim/2) turns by theta_base^(-2i/head_dim)
    radians per position. `dtype` is the dtype the positions are counted in, as in the
    book (the tables themselves are float32). They live on the CPU even inside a
    `torch.device("meta")` block, so a model built there for weight loading still has
    real tables.
    """
    if head_dim % 2:
        raise ValueError(f"head_dim must be even, got {head_dim}")
    cpu = torch.device("cpu")
    inv_freq = 1.0 / (theta_base ** (torch.arange(0, head_dim, 2, dtype=dtype, device=cpu).float() / head_dim))
    if freq_config is not None:
        inv_freq = scale_rope_frequencies(inv_freq, **freq_config)
    positions = torch.arange(context_length, dtype=dtype, device=cpu)
    angles = positions[:, None] * inv_freq[None, :]  # (context_length, head_dim // 2)
    angles = torch.cat([angles, angles], dim=1)      # the same angle for both halves of a pair
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, start_pos: int = 0) -> torch.Tensor:
    """Rotate each (x[i], x[i + head_dim/2]) pair of x (batch, heads, tokens, head_dim) by its angle.

    The tokens are at positions start_pos, start_pos + 1, ... (start_pos > 0 with a KV
    cache). The rotation is computed in float32 and cast back, as in the book. Hugging
    Face's checkpoints pair feature i with i + head_dim/2 ("rotate half"); Meta's original
    checkpoints pair neighbours (see `permute`).
    """
    num_tokens, half = x.shape[2], x.shape[3] // 2
    cos = cos[start_pos:start_pos + num_tokens]
    sin = sin[start_pos:start_pos + num_tokens]
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos + rotated * sin).to(dtype=x.dtype)


#####################################
# Building blocks
#####################################

class RMSNorm(nn.Module):
    """Scale each token's features to unit root-mean-square, then by a learned weight.

    Unlike LayerNorm there is no mean subtraction and no shift: cheaper, and it works as
    well. The statistics are computed in float32 even for bfloat16 inputs (as Hugging
    Face's LlamaRMSNorm does), since squares of small bfloat16 numbers lose precision.
    """

    def __init__(self, emb_dim: int, eps: float = 1e-5, dtype: torch.dtype | None = None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(emb_dim, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class FeedForward(nn.Module):
    """SwiGLU: silu(fc1(x)) gates fc2(x) elementwise, then fc3 projects back."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.fc1 = nn.Linear(cfg["emb_dim"], cfg["hidden_dim"], dtype=cfg["dtype"], bias=False)
        self.fc2 = nn.Linear(cfg["emb_dim"], cfg["hidden_dim"], dtype=cfg["dtype"], bias=False)
        self.fc3 = nn.Linear(cfg["hidden_dim"], cfg["emb_dim"], dtype=cfg["dtype"], bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.silu(self.fc1(x)) * self.fc2(x))


class KVCache:
    """Keys and values of every layer for up to `max_len` positions, allocated once.

    `pos` is the number of positions already stored; the model advances it after each
    forward pass. Preallocating (instead of concatenating) keeps memory flat and avoids
    re-copying the cache at every step.
    """

    def __init__(self, cfg: dict, batch_size: int, max_len: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype | None = None):
        if max_len > cfg["context_length"]:
            raise ValueError(f"max_len {max_len} exceeds the model's context length {cfg['context_length']}.")
        head_dim = cfg["emb_dim"] // cfg["n_heads"]
        shape = (cfg["n_layers"], batch_size, cfg["n_kv_groups"], max_len, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype or cfg["dtype"], device=device)
        self.values = torch.zeros_like(self.keys)
        self.max_len = max_len
        self.pos = 0

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new positions' keys/values of `layer`; return all stored so far."""
        end = self.pos + keys.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions needed, {self.max_len} allocated.")
        self.keys[layer, :, :, self.pos:end] = keys
        self.values[layer, :, :, self.pos:end] = values
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]


def causal_mask(num_queries: int, num_keys: int, start_pos: int, device: torch.device) -> torch.Tensor:
    """The book's mask: True where query i (at position start_pos + i) must not see key j (j > start_pos + i)."""
    return torch.triu(torch.ones(num_queries, num_keys, dtype=torch.bool, device=device), diagonal=start_pos + 1)


def attention_manual(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(QK^T / sqrt(d)) V written out, as in chapter 3 (the benchmark's baseline)."""
    scores = queries @ keys.transpose(2, 3) / keys.shape[-1] ** 0.5
    if mask is not None:
        scores = scores.masked_fill(mask, -torch.inf)
    return torch.softmax(scores.float(), dim=-1).to(values.dtype) @ values


class GroupedQueryAttention(nn.Module):
    """Causal self-attention in which groups of query heads share one key/value head.

    With `num_kv_groups` key-value heads instead of `num_heads`, the key/value
    projections and the KV cache shrink by num_heads / num_kv_groups. With
    num_kv_groups == num_heads it is ordinary multi-head attention (Llama 2).
    `attn_impl="sdpa"` uses PyTorch's fused scaled_dot_product_attention instead of
    the written-out softmax (same result up to rounding).
    """

    def __init__(self, d_in: int, d_out: int, num_heads: int, num_kv_groups: int, dtype: torch.dtype | None = None,
                 *, attn_impl: str = "manual"):
        super().__init__()
        if d_out % num_heads or num_heads % num_kv_groups:
            raise ValueError(f"need d_out % num_heads == 0 and num_heads % num_kv_groups == 0, got "
                             f"d_out={d_out}, num_heads={num_heads}, num_kv_groups={num_kv_groups}")
        if attn_impl not in ("sdpa", "manual"):
            raise ValueError(f"attn_impl must be 'sdpa' or 'manual', got {attn_impl!r}")
        self.d_out = d_out
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.num_kv_groups = num_kv_groups
        self.group_size = num_heads // num_kv_groups
        self.attn_impl = attn_impl
        self.W_key = nn.Linear(d_in, num_kv_groups * self.head_dim, bias=False, dtype=dtype)
        self.W_value = nn.Linear(d_in, num_kv_groups * self.head_dim, bias=False, dtype=dtype)
        self.W_query = nn.Linear(d_in, d_out, bias=False, dtype=dtype)
        self.out_proj = nn.Linear(d_out, d_out, bias=False, dtype=dtype)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, cos: torch.Tensor | None = None,
                sin: torch.Tensor | None = None, *, kv_cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        """`mask` is the book's boolean mask (True = may not attend); None means causal. Without
        cos/sin no rotation is applied. With `kv_cache`, `x` holds only the new positions."""
        b, num_tokens, _ = x.shape
        start_pos = kv_cache.pos if kv_cache is not None else 0
        queries = self.W_query(x).view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        keys = self.W_key(x).view(b, num_tokens, self.num_kv_groups, self.head_dim).transpose(1, 2)
        values = self.W_value(x).view(b, num_tokens, self.num_kv_groups, self.head_dim).transpose(1, 2)
        if cos is not None:
            queries = apply_rope(queries, cos, sin, start_pos=start_pos)
            keys = apply_rope(keys, cos, sin, start_pos=start_pos)
        if kv_cache is not None:
            keys, values = kv_cache.update(layer, keys, values)

        # Each key/value head serves group_size consecutive query heads: [K1, K2] -> [K1, K1, K2, K2].
        keys = keys.repeat_interleave(self.group_size, dim=1)
        values = values.repeat_interleave(self.group_size, dim=1)

        # One new token may see everything cached; a chunk starting at 0 is the plain causal
        # triangle (SDPA has a fast path for it); a chunk after cached positions needs the offset.
        is_causal = mask is None and num_tokens > 1 and start_pos == 0
        if mask is None and num_tokens > 1 and start_pos > 0:
            mask = causal_mask(num_tokens, keys.shape[2], start_pos, x.device)
        if self.attn_impl == "sdpa":
            context = F.scaled_dot_product_attention(queries, keys, values,
                                                     attn_mask=None if mask is None else ~mask, is_causal=is_causal)
        else:
            if is_causal:
                mask = causal_mask(num_tokens, num_tokens, 0, x.device)
            context = attention_manual(queries, keys, values, mask)
        return self.out_proj(context.transpose(1, 2).reshape(b, num_tokens, self.d_out))


class TransformerBlock(nn.Module):
    """x + attention(RMSNorm(x)), then x + SwiGLU(RMSNorm(x)); no dropout."""

    def __init__(self, cfg: dict):
        super().__init__()
        cfg = check_config(cfg)
        self.att = GroupedQueryAttention(cfg["emb_dim"], cfg["emb_dim"], cfg["n_heads"], cfg["n_kv_groups"],
                                         dtype=cfg["dtype"], attn_impl=cfg["attn_impl"])
        self.ff = FeedForward(cfg)
        self.norm1 = RMSNorm(cfg["emb_dim"], eps=cfg["rms_norm_eps"], dtype=cfg["dtype"])
        self.norm2 = RMSNorm(cfg["emb_dim"], eps=cfg["rms_norm_eps"], dtype=cfg["dtype"])

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, cos: torch.Tensor | None = None,
                sin: torch.Tensor | None = None, *, kv_cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.att(self.norm1(x), mask, cos, sin, kv_cache=kv_cache, layer=layer)
        return x + self.ff(self.norm2(x))


class Llama3Model(nn.Module):
    """Token embedding, `n_layers` blocks, a final RMSNorm and the output head.

    No position embedding layer: positions enter through RoPE inside attention; the
    cos/sin tables are computed once here and handed to every block. With
    `tie_embeddings` the output head *is* the embedding matrix (one Parameter, stored
    once), as in Llama 3.2 1B/3B; without it the head is tied only when loaded from a
    checkpoint that has no head of its own (`load_weights_into_llama`), as in the book.
    """

    def __init__(self, cfg: dict):
        super().__init__()
        cfg = check_config(cfg)
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"], dtype=cfg["dtype"])
        self.trf_blocks = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg["n_layers"]))
        self.final_norm = RMSNorm(cfg["emb_dim"], eps=cfg["rms_norm_eps"], dtype=cfg["dtype"])
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False, dtype=cfg["dtype"])
        if cfg["tie_embeddings"]:
            self.out_head.weight = self.tok_emb.weight
        cos, sin = compute_rope_params(cfg["emb_dim"] // cfg["n_heads"], cfg["rope_base"], cfg["context_length"],
                                       cfg["rope_freq"])
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, in_idx: torch.Tensor, *, kv_cache: KVCache | None = None) -> torch.Tensor:
        """Logits (batch, tokens, vocab). With `kv_cache`, `in_idx` holds only the new tokens."""
        start_pos = kv_cache.pos if kv_cache is not None else 0
        if start_pos + in_idx.shape[1] > self.cfg["context_length"]:
            raise ValueError(f"{start_pos + in_idx.shape[1]} positions exceed the context length "
                             f"{self.cfg['context_length']}; shorten the input or raise context_length.")
        x = self.tok_emb(in_idx)
        for layer, block in enumerate(self.trf_blocks):
            x = block(x, None, self.cos, self.sin, kv_cache=kv_cache, layer=layer)  # mask None: causal
        if kv_cache is not None:
            kv_cache.pos += in_idx.shape[1]
        return self.out_head(self.final_norm(x).to(self.out_head.weight.dtype))


class Llama3ModelFast(Llama3Model):
    """`Llama3Model` with PyTorch's scaled_dot_product_attention in every block (FlashAttention on
    GPUs that have it): the same weights, names and outputs up to rounding, less time and memory."""

    def __init__(self, cfg: dict):
        super().__init__({**cfg, "attn_impl": "sdpa"})


def count_unique_parameters(model: nn.Module) -> int:
    """Parameters stored in memory: a tensor shared by two modules (tied embeddings) counts once.

    Shared storage is recognised by its address, as in the book; on the "meta" device,
    where every tensor reports address 0, by the Parameter object instead.
    """
    seen, total = set(), 0
    for param in model.parameters():
        key = id(param) if param.is_meta else param.data_ptr()
        if key not in seen:
            seen.add(key)
            total += param.numel()
    return total


def calc_model_memory_size(model: nn.Module, input_dtype: torch.dtype = torch.float32) -> float:
    """The book's estimate in GB (2**30 bytes) for training: parameters, their gradients and the buffers,
    all stored in `input_dtype`. Works on a model built on the "meta" device."""
    total_params = sum(p.numel() for p in model.parameters())
    total_grads = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total_buffers = sum(b.numel() for b in model.buffers())
    element_size = torch.tensor(0, dtype=input_dtype).element_size()
    return (total_params + total_grads + total_buffers) * element_size / 1024**3


#####################################
# Generation
#####################################

class CachedStepper:
    """Makes the book's `generate` loop use a KV cache, without a second copy of that loop.

    `generate` calls `model(idx[:, -context_size:])` once per new token and reads the
    last position's logits. This callable remembers which tokens the cache already holds
    and runs the model on the new ones only. Once the text outgrows the context window,
    the window slides and the cache no longer matches it, so from then on it re-reads
    the window, exactly as `generate` does without a cache.
    """

    def __init__(self, model: Llama3Model, batch_size: int, max_len: int, device: torch.device):
        self.model = model
        self.cache = KVCache(model.cfg, batch_size, max_len, device=device, dtype=model.tok_emb.weight.dtype)
        self.window_slid = False

    def __call__(self, idx_cond: torch.Tensor) -> torch.Tensor:
        n_new = idx_cond.shape[1] - self.cache.pos
        if self.window_slid or n_new < 1 or self.cache.pos + n_new > self.cache.max_len:
            self.window_slid = True
            return self.model(idx_cond)
        return self.model(idx_cond[:, self.cache.pos:], kv_cache=self.cache)


def generate(model: nn.Module, idx: torch.Tensor, max_new_tokens: int, context_size: int,
             temperature: float = 0.0, top_k: int | None = None, eos_id: int | None = None, *,
             use_cache: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
    """The book's `generate` (previous_chapters.generate): temperature 0 is greedy, `top_k` keeps the k
    most likely tokens, generation stops before appending `eos_id`.

    `use_cache=True` (a `Llama3Model` only) runs the prompt once and then feeds one token
    per step through a KV cache: the same tokens, much less work for long texts.
    """
    if use_cache:
        max_len = min(idx.shape[1] + max_new_tokens, context_size, model.cfg["context_length"])
        model = CachedStepper(model, idx.shape[0], max_len, idx.device)
    return chapter_generate(model, idx, max_new_tokens, context_size, temperature, top_k, eos_id,
                            generator=generator)


#####################################
# Tokenizers and chat formats
#####################################

# How Llama 3 pre-splits text before byte-pair merging (from Meta's reference code):
# contractions, words with an optional leading non-letter, numbers of up to 3 digits,
# punctuation runs, newlines and other whitespace.
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(3, 248)]


def read_tiktoken_ranks(path: str | Path) -> dict[bytes, int]:
    """Read a tiktoken BPE file: one `base64(token) rank` pair per line (Meta's tokenizer.model).

    Read directly rather than with tiktoken's `load_tiktoken_bpe`, which caches files
    under a key made from their *path*: a different file later saved at the same path
    would silently get the old ranks.
    """
    ranks = {}
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Tokenizer file not found: {path}. For Llama 3 it is original/tokenizer.model "
                                "in the Hugging Face repository.")
    for line_no, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise ValueError(f"{path}:{line_no} is not a tiktoken 'base64 rank' line; is this a Llama 3 "
                             "tokenizer.model (Llama 2's is a sentencepiece file: use LlamaTokenizer)?") from None
    if not ranks:
        raise ValueError(f"{path} is empty; download the tokenizer again.")
    return ranks


class Llama3Tokenizer:
    """Llama 3's tokenizer (the book's `Tokenizer`): tiktoken BPE over the ranks of Meta's
    tokenizer.model, plus 256 special tokens numbered after them (128,000-128,255).

    `special` maps the special tokens' names to their ids. As with the book's, `encode`
    refuses text that contains a special token's string (tiktoken raises ValueError);
    pass `disallowed_special=()` to encode such text as plain text, or list the tokens
    in `allowed_special` to turn them into the special ids.
    """

    def __init__(self, model_path: str | Path):
        import tiktoken

        ranks = read_tiktoken_ranks(model_path)
        self.special = {name: len(ranks) + i for i, name in enumerate(LLAMA3_SPECIAL_TOKENS)}
        self.model = tiktoken.Encoding(name=Path(model_path).name, pat_str=LLAMA3_SPLIT_PATTERN,
                                       mergeable_ranks=ranks, special_tokens=self.special)
        self.bos_id = self.special["<|begin_of_text|>"]
        self.eos_id = self.special["<|end_of_text|>"]
        self.eot_id = self.special["<|eot_id|>"]
        self.n_vocab = self.model.n_vocab

    def encode(self, text: str, bos: bool = False, eos: bool = False, *,
               allowed_special: set[str] | frozenset[str] = frozenset(),
               disallowed_special: str | tuple = "all") -> list[int]:
        ids = self.model.encode(text, allowed_special=set(allowed_special), disallowed_special=disallowed_special)
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids: list[int]) -> str:
        return self.model.decode(ids)


Tokenizer = Llama3Tokenizer  # the book's name for it


class ChatFormat:
    """Llama 3's chat layout, the book's `ChatFormat(tokenizer, default_system=...)`:

        <|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\n{system}<|eot_id|>
        <|start_header_id|>user<|end_header_id|>\\n\\n{question}<|eot_id|>
        <|start_header_id|>assistant<|end_header_id|>\\n\\n      <- the model continues here

    (without the line breaks drawn above). The model ends its turn with <|eot_id|>.
    `encode_dialog` and `decode_reply` add multi-message prompts and reply extraction.
    """

    def __init__(self, tokenizer: Llama3Tokenizer, *, default_system: str = "You are a helpful assistant."):
        self.tok = tokenizer
        self.default_system = default_system

    def _header(self, role: str) -> list[int]:
        """<|start_header_id|>role<|end_header_id|>\\n\\n"""
        return ([self.tok.special["<|start_header_id|>"]] + self.tok.encode(role)
                + [self.tok.special["<|end_header_id|>"]] + self.tok.encode("\n\n"))

    def encode(self, user_message: str, system_message: str | None = None) -> list[int]:
        """A one-question prompt with a system message (`default_system` if None), ending in the assistant header."""
        system = system_message if system_message is not None else self.default_system
        return self.encode_dialog([{"role": "system", "content": system}, {"role": "user", "content": user_message}])

    def encode_dialog(self, messages: list[dict]) -> list[int]:
        """[{"role": "system"|"user"|"assistant", "content": ...}, ...] -> a prompt ending in the assistant header."""
        ids = [self.tok.special["<|begin_of_text|>"]]
        for message in messages:
            if set(message) != {"role", "content"}:
                raise ValueError(f"Each message needs exactly 'role' and 'content', got {sorted(message)}")
            ids += self._header(message["role"]) + self.tok.encode(message["content"])
            ids.append(self.tok.special["<|eot_id|>"])
        return ids + self._header("assistant")

    def decode(self, token_ids: list[int]) -> str:
        return self.tok.decode(token_ids)

    def decode_reply(self, ids: list[int]) -> str:
        """The assistant's text: everything generated before its <|eot_id|> (or end of text)."""
        for stop in (self.tok.special["<|eot_id|>"], self.tok.special["<|end_of_text|>"]):
            if stop in ids:
                ids = ids[:ids.index(stop)]
        return self.tok.decode(ids).strip()


def clean_text(text: str, header_end: str = "assistant<|end_header_id|>\n\n") -> str:
    """The reply in a decoded chat: the text after the first `header_end`, stripped (all of it if absent)."""
    index = text.find(header_end)
    return text[index + len(header_end):].strip() if index != -1 else text


class LlamaTokenizer:
    """Llama 2's sentencepiece tokenizer (32,000 pieces, byte fallback), the book's `LlamaTokenizer`.

    As in the book, `encode(text)` gives the pieces only; Meta's reference code puts the
    beginning-of-sequence id <s> = 1 in front, which `bos=True` does.
    """

    def __init__(self, tokenizer_file: str | Path):
        import sentencepiece as spm

        if not Path(tokenizer_file).is_file():
            raise FileNotFoundError(f"Tokenizer file not found: {tokenizer_file}. For Llama 2 it is tokenizer.model "
                                    "in the Hugging Face repository.")
        sp = spm.SentencePieceProcessor()
        try:
            sp.load(str(tokenizer_file))
        except (OSError, RuntimeError):
            raise ValueError(f"{tokenizer_file} is not a sentencepiece model (Llama 2's tokenizer.model); "
                             "download it again (Llama 3's tokenizer.model is read by Tokenizer).") from None
        self.tokenizer = sp
        self.bos_id, self.eos_id = sp.bos_id(), sp.eos_id()
        self.n_vocab = sp.get_piece_size()

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        return [self.bos_id] * bos + self.tokenizer.encode(text, out_type=int) + [self.eos_id] * eos

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)


Llama2Tokenizer = LlamaTokenizer


def format_llama2_chat(user_message: str, system_prompt: str | None = None) -> str:
    """Llama 2 chat's single-turn prompt; encode it with bos=True."""
    user_message = user_message.strip()
    if system_prompt:
        user_message = f"<<SYS>>\n{system_prompt.strip()}\n<</SYS>>\n\n{user_message}"
    return f"[INST] {user_message} [/INST]"


#####################################
# Loading weights
#####################################

# Checkpoint tensor names -> ours, per layer and for the rest: Hugging Face's layout and
# Meta's original one (consolidated.00.pth, which the Llama 2 notebook loads).
HF_LAYER_NAMES = {
    "self_attn.q_proj.weight": "att.W_query.weight",
    "self_attn.k_proj.weight": "att.W_key.weight",
    "self_attn.v_proj.weight": "att.W_value.weight",
    "self_attn.o_proj.weight": "att.out_proj.weight",
    "mlp.gate_proj.weight": "ff.fc1.weight",
    "mlp.up_proj.weight": "ff.fc2.weight",
    "mlp.down_proj.weight": "ff.fc3.weight",
    "input_layernorm.weight": "norm1.weight",
    "post_attention_layernorm.weight": "norm2.weight",
}
HF_OTHER_NAMES = {
    "model.embed_tokens.weight": "tok_emb.weight",
    "model.norm.weight": "final_norm.weight",
    "lm_head.weight": "out_head.weight",
}
META_LAYER_NAMES = {
    "attention.wq.weight": "att.W_query.weight",
    "attention.wk.weight": "att.W_key.weight",
    "attention.wv.weight": "att.W_value.weight",
    "attention.wo.weight": "att.out_proj.weight",
    "feed_forward.w1.weight": "ff.fc1.weight",   # gate
    "feed_forward.w3.weight": "ff.fc2.weight",   # up (Meta numbers them w1, w3, w2 in data-flow order)
    "feed_forward.w2.weight": "ff.fc3.weight",   # down
    "attention_norm.weight": "norm1.weight",
    "ffn_norm.weight": "norm2.weight",
}
META_OTHER_NAMES = {
    "tok_embeddings.weight": "tok_emb.weight",
    "norm.weight": "final_norm.weight",
    "output.weight": "out_head.weight",
}
LAYOUTS = {"hf": ("model.layers.{}.", HF_LAYER_NAMES, HF_OTHER_NAMES),
           "meta": ("layers.{}.", META_LAYER_NAMES, META_OTHER_NAMES)}


def hf_to_our_name(hf_name: str) -> str | None:
    """Our parameter name for a Hugging Face Llama tensor name (None if it is not a Llama weight)."""
    if hf_name in HF_OTHER_NAMES:
        return HF_OTHER_NAMES[hf_name]
    parts = hf_name.split(".", 3)  # model, layers, i, rest
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit() and parts[3] in HF_LAYER_NAMES:
        return f"trf_blocks.{parts[2]}.{HF_LAYER_NAMES[parts[3]]}"
    return None


def checkpoint_names(n_layers: int, layout: str) -> dict[str, str]:
    """{our parameter name: the checkpoint's tensor name} for a model with `n_layers` blocks."""
    prefix, layer_names, other_names = LAYOUTS[layout]
    names = {ours: theirs for theirs, ours in other_names.items()}
    for layer in range(n_layers):
        names.update({f"trf_blocks.{layer}.{ours}": prefix.format(layer) + theirs
                      for theirs, ours in layer_names.items()})
    return names


def permute(w: torch.Tensor, n_heads: int, out_dim: int, in_dim: int) -> torch.Tensor:
    """Meta's original q/k weights -> the "rotate half" layout our RoPE (and Hugging Face's) expects.

    Meta's checkpoints rotate *neighbouring* features of a head together (pairs 0-1,
    2-3, ...); `apply_rope` rotates feature i with i + head_dim/2. Reordering each head's
    output rows, first all even features then all odd ones, makes the two agree.
    """
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def assign(left: torch.Tensor, right, tensor_name: str = "unknown") -> torch.Tensor:
    """Copy `right` into the parameter `left` (after checking the shapes) and return it, as in the book.

    A `left` on the "meta" device has no storage to copy into; then a new Parameter
    holding `right` (in left's dtype, on right's device) is returned instead, which is
    how a model built on the meta device gets its weights without a second copy.
    """
    if tuple(left.shape) != tuple(right.shape):
        raise ValueError(f"Shape mismatch in tensor '{tensor_name}'. Left: {tuple(left.shape)}, Right: "
                         f"{tuple(right.shape)}: the config does not fit this checkpoint (e.g. LLAMA32_CONFIG_3B "
                         "for a 3B checkpoint, or build it with config_from_hf).")
    right = torch.as_tensor(right)
    if left.is_meta:
        return nn.Parameter(right.to(dtype=left.dtype), requires_grad=left.requires_grad)
    with torch.no_grad():
        left.copy_(right)
    return left


def _check_checkpoint_names(params: Mapping, names: dict[str, str], n_layers: int, layout: str) -> None:
    """Refuse a checkpoint that lacks tensors or has more layers than the model, before changing anything."""
    needed = [theirs for ours, theirs in names.items() if ours != "out_head.weight"]
    missing = [name for name in needed if name not in params]
    if len(missing) == len(needed):
        raise ValueError(f"None of the {len(needed)} Llama tensors was found (the checkpoint has e.g. "
                         f"{list(params)[:3]}): this is not a Llama checkpoint.")
    if missing:
        raise ValueError(f"The checkpoint lacks {len(missing)} tensor(s) the model needs, e.g. {missing[:3]}; "
                         "the files are incomplete or the model has more layers than the checkpoint.")
    layer_re = re.compile(re.escape(LAYOUTS[layout][0]).replace(r"\{\}", r"(\d+)"))
    extra = sorted({int(m.group(1)) for name in params if (m := layer_re.match(name))} - set(range(n_layers)))
    if extra:
        raise ValueError(f"The checkpoint has layer(s) {extra[:3]}... beyond the model's n_layers={n_layers}; "
                         "build the model with the checkpoint's config.")


def load_weights_into_llama(model: nn.Module, param_config: dict, params: Mapping) -> None:
    """Put a checkpoint's tensors `params` into `model`, the book's `load_weights_into_llama`.

    `params` maps tensor names to tensors in Hugging Face's layout
    (model.layers.0.self_attn.q_proj.weight, ...; safetensors files) or in Meta's
    original one (layers.0.attention.wq.weight, ...; consolidated.00.pth), whose query
    and key rows are reordered with `permute`. Only param_config["n_layers"] is read, as
    in the book. A checkpoint without an output head (Llama 3.2) gets the head tied to
    the token embedding. Works for models built on the "meta" device too (see `assign`).
    """
    n_layers = param_config["n_layers"]
    if n_layers != len(model.trf_blocks):
        raise ValueError(f"param_config has n_layers={n_layers}, the model {len(model.trf_blocks)} blocks.")
    layout = "meta" if "tok_embeddings.weight" in params else "hf"
    names = checkpoint_names(n_layers, layout)
    _check_checkpoint_names(params, names, n_layers, layout)
    was_tied = model.out_head.weight is model.tok_emb.weight
    head_in_checkpoint = names["out_head.weight"] in params and not was_tied
    for ours, theirs in names.items():
        if ours == "out_head.weight" and not head_in_checkpoint:
            continue
        module_name, attr = ours.rsplit(".", 1)
        module = model.get_submodule(module_name)
        tensor = params[theirs]
        if layout == "meta" and module_name.endswith(("W_query", "W_key")):
            att = model.get_submodule(module_name.rsplit(".", 1)[0])
            heads = att.num_heads if module_name.endswith("W_query") else getattr(att, "num_kv_groups", att.num_heads)
            tensor = permute(tensor, heads, tensor.shape[0], tensor.shape[1])
        setattr(module, attr, assign(getattr(module, attr), tensor, theirs))
    if not head_in_checkpoint:
        model.out_head.weight = model.tok_emb.weight
        if not was_tied:
            print("Model uses weight tying.")


class SafetensorsWeights(Mapping):
    """The tensors of one or more safetensors files, each read from the memory-mapped file
    only when asked for (and converted to `dtype` on `device`).

    Handed to `load_weights_into_llama` as its `params`, it keeps peak memory near one
    copy of the weights: no tensor is read before the model needs it. A file that is not
    a complete safetensors file is reported by name.
    """

    def __init__(self, files: list[str | Path], device: torch.device | str = "cpu", dtype: torch.dtype | None = None):
        from safetensors import safe_open

        self.device, self.dtype = device, dtype
        self._file_of, self._handles = {}, {}
        for path in files:
            try:
                handle = safe_open(str(path), framework="pt", device="cpu")
            except FileNotFoundError:
                raise FileNotFoundError(f"Checkpoint file not found: {path}; download the checkpoint again.") from None
            except Exception as err:  # safetensors raises its own error types for truncated or foreign files
                raise ValueError(f"{path} is not a complete safetensors file ({type(err).__name__}: "
                                 f"{str(err).splitlines()[0][:120]}); delete it and download it again.") from None
            self._handles[str(path)] = handle
            for name in handle.keys():
                if name in self._file_of:
                    raise ValueError(f"Tensor {name} is in both {self._file_of[name]} and {path}: these files are "
                                     "not the shards of one checkpoint.")
                self._file_of[name] = str(path)

    def __getitem__(self, name: str) -> torch.Tensor:
        path = self._file_of[name]
        try:
            tensor = self._handles[path].get_tensor(name)
        except Exception as err:
            raise ValueError(f"Could not read {name} from {path} ({type(err).__name__}); the file is damaged: "
                             "delete it and download it again.") from None
        return tensor.to(device=self.device, dtype=self.dtype or tensor.dtype)

    def __contains__(self, name: object) -> bool:
        return name in self._file_of  # without reading the tensor, as Mapping's default would

    def __iter__(self) -> Iterator[str]:
        return iter(self._file_of)

    def __len__(self) -> int:
        return len(self._file_of)


HF_REQUIRED_KEYS = ("vocab_size", "max_position_embeddings", "hidden_size", "num_attention_heads",
                    "num_hidden_layers", "intermediate_size")


def config_from_hf(hf_config: dict, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Our config dict from a Hugging Face Llama `config.json` (rope keys of transformers 4.x and 5.x).

    Optional keys get the defaults `transformers`' LlamaConfig gives them, so the model
    is the one `transformers` would build from the same file.
    """
    missing = [key for key in HF_REQUIRED_KEYS if key not in hf_config]
    if missing:
        raise ValueError(f"lacks {missing} (is this a Llama config.json?)")
    rope = hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise ValueError(f"has RoPE type {rope_type!r}, not a Llama 2/3 RoPE; this code supports 'default' and "
                         "'llama3'.")
    if rope_type == "llama3" and (gaps := [k for k in ("factor", "low_freq_factor", "high_freq_factor",
                                                        "original_max_position_embeddings") if k not in rope]):
        raise ValueError(f"has a 'llama3' RoPE scaling without {gaps}")
    head_dim = hf_config.get("head_dim") or hf_config["hidden_size"] // hf_config["num_attention_heads"]
    if head_dim * hf_config["num_attention_heads"] != hf_config["hidden_size"]:
        raise ValueError("has head_dim * num_attention_heads != hidden_size: not supported by this code.")
    return {
        "vocab_size": hf_config["vocab_size"],
        "context_length": hf_config["max_position_embeddings"],
        "emb_dim": hf_config["hidden_size"],
        "n_heads": hf_config["num_attention_heads"],
        "n_layers": hf_config["num_hidden_layers"],
        "hidden_dim": hf_config["intermediate_size"],
        "n_kv_groups": hf_config.get("num_key_value_heads") or hf_config["num_attention_heads"],
        "rope_base": float(rope.get("rope_theta", hf_config.get("rope_theta", 10_000.0))),
        "rope_freq": None if rope_type == "default" else {
            "factor": rope["factor"], "low_freq_factor": rope["low_freq_factor"],
            "high_freq_factor": rope["high_freq_factor"],
            "original_context_length": rope["original_max_position_embeddings"]},
        "rms_norm_eps": hf_config.get("rms_norm_eps", 1e-6),
        "tie_embeddings": hf_config.get("tie_word_embeddings", False),
        "dtype": dtype,
    }


def read_hf_config(path: str | Path, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Our config from a checkpoint's config.json; any problem is one ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No config.json in {path.parent}: not a Hugging Face checkpoint folder.")
    try:
        hf_config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); delete it and download the checkpoint again.") from None
    if not isinstance(hf_config, dict):
        raise ValueError(f"{path} holds a JSON {type(hf_config).__name__}, not a model config.")
    try:
        cfg = check_config(config_from_hf(hf_config, dtype))
    except ValueError as err:
        raise ValueError(f"{path} {err}") from None
    return cfg


def safetensors_files(checkpoint_dir: str | Path) -> list[Path]:
    """The weight files of a Hugging Face checkpoint folder: every shard named in its index, or the single file."""
    checkpoint_dir = Path(checkpoint_dir)
    index = checkpoint_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise ValueError(f"{index} is not a safetensors index (a JSON object with a 'weight_map'); "
                             "delete it and download the checkpoint again.") from None
        files = [checkpoint_dir / name for name in shards]
    else:
        files = [checkpoint_dir / "model.safetensors"]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"Checkpoint files missing: {missing}. Download the checkpoint again "
                                "(download_llama_checkpoint) or check the folder.")
    return files


def load_llama_from_safetensors(cfg: dict, files: list[str | Path], device: torch.device | str = "cpu") -> Llama3Model:
    """Build a Llama3Model for `cfg` and fill it from Hugging Face safetensors `files`.

    Low peak memory: the model is first built on the "meta" device (shapes, no storage),
    then `load_weights_into_llama` installs each tensor as it is read from the
    memory-mapped file, converted to cfg["dtype"] and moved to `device`. So the process
    never holds a second full copy of the weights (the naive way, a random-initialized
    model plus a loaded state dict, needs two). The model comes in eval mode, without
    gradients, ready for generation.
    """
    cfg = check_config(cfg)
    params = SafetensorsWeights(files, device=device, dtype=cfg["dtype"])
    with torch.device("meta"):
        model = Llama3Model(cfg)
    load_weights_into_llama(model, cfg, params)
    model.cos, model.sin = model.cos.to(device), model.sin.to(device)
    return model.requires_grad_(False).eval()  # for inference; call requires_grad_() to fine-tune


GATED_HELP = ("Meta's Llama weights are gated on Hugging Face: log in at https://huggingface.co/{repo}, accept "
              "the license, create an access token (https://huggingface.co/settings/tokens) and pass it as "
              "`token=`, set the HF_TOKEN environment variable, or put it into config.json as HF_ACCESS_TOKEN.")
TOKEN_PLACEHOLDER = "hf-..."


def read_access_token(config_path: str | Path = "config.json") -> str:
    """Your Hugging Face access token: the HF_TOKEN environment variable, else config.json's
    HF_ACCESS_TOKEN (the book's way: copy your token into that file; never commit it)."""
    if os.environ.get("HF_TOKEN"):
        return os.environ["HF_TOKEN"]
    path = Path(config_path)
    if not path.is_file():
        raise FileNotFoundError(f"No HF_TOKEN environment variable and no {path}. " + GATED_HELP.format(repo=""))
    try:
        token = json.loads(path.read_text(encoding="utf-8")).get("HF_ACCESS_TOKEN")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        raise ValueError(f"{path} is not a JSON object like {{\"HF_ACCESS_TOKEN\": \"hf_...\"}}; fix it.") from None
    if not isinstance(token, str) or not token or token == TOKEN_PLACEHOLDER:
        raise ValueError(f"{path} has no access token under HF_ACCESS_TOKEN (it says {token!r}); paste yours "
                         "from https://huggingface.co/settings/tokens.")
    return token


def download_llama_checkpoint(repo_id: str = "meta-llama/Llama-3.2-1B-Instruct", token: str | None = None,
                              local_dir: str | Path | None = None) -> Path:
    """Download config, safetensors and tokenizer of a gated Meta repository; return the folder."""
    from huggingface_hub import get_token, snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    token = token or os.environ.get("HF_TOKEN") or get_token()
    if not token:
        raise PermissionError("No Hugging Face access token found. " + GATED_HELP.format(repo=repo_id))
    try:
        folder = snapshot_download(
            repo_id, token=token, local_dir=local_dir,
            allow_patterns=["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.model",
                            "original/tokenizer.model"])
    except GatedRepoError:
        raise PermissionError(f"Your token has no access to {repo_id} yet. "
                              + GATED_HELP.format(repo=repo_id)) from None
    except RepositoryNotFoundError:
        raise ValueError(f"No repository {repo_id} on Hugging Face (or your token may not see it); check the name, "
                         "e.g. meta-llama/Llama-3.2-1B-Instruct.") from None
    except LocalEntryNotFoundError:
        raise ConnectionError(f"Could not reach Hugging Face to download {repo_id}, and it is not cached. Connect "
                              "to the internet, or pass the folder of a copy you downloaded elsewhere.") from None
    return Path(folder)


def load_llama_checkpoint(checkpoint_dir: str | Path, dtype: torch.dtype = torch.bfloat16,
                          device: torch.device | str = "cpu", context_length: int | None = None, *,
                          attn_impl: str = "sdpa") -> Llama3Model:
    """A model from a downloaded Hugging Face folder, configured by its config.json.

    `context_length` may shorten the RoPE tables (the full 131,072 positions take
    64-128 MB) when you know you need fewer positions. Attention uses PyTorch's fused
    kernel unless `attn_impl="manual"`.
    """
    checkpoint_dir = Path(checkpoint_dir)
    cfg = read_hf_config(checkpoint_dir / "config.json", dtype=dtype)
    cfg["attn_impl"] = attn_impl
    if context_length is not None:
        cfg["context_length"] = min(context_length, cfg["context_length"])
    return load_llama_from_safetensors(cfg, safetensors_files(checkpoint_dir), device=device)
