"""Meta's Llama 3.2 (and Llama 3, 3.1 and 2) in one self-contained file.

The model is the chapter's GPT with the changes that `converting-gpt-to-llama2.ipynb`
and `converting-llama2-to-llama3.ipynb` walk through: RMSNorm instead of LayerNorm, a
gated SiLU feed-forward (SwiGLU), rotary position embeddings (RoPE, with Llama 3.1's
frequency scaling), grouped-query attention, no biases and no dropout. On top of that
it adds what running a real 1B/3B model needs:

* a key-value cache, so each new token costs one position instead of the whole text;
* bfloat16 weights (half the memory of float32) via the config's "dtype";
* `torch.nn.functional.scaled_dot_product_attention`, which picks FlashAttention or
  other fused kernels where the hardware has them;
* loading Hugging Face safetensors tensor by tensor into a model built on the "meta"
  device, so peak memory stays near one copy of the weights;
* the tiktoken-based Llama 3 tokenizer and its chat format (and, for Llama 2, the
  sentencepiece tokenizer and its `[INST]` format).

Llama 2 is the special case n_kv_groups == n_heads, rope_base 10,000, no RoPE scaling.
Only torch (plus tiktoken / sentencepiece for the tokenizers and huggingface_hub for
downloads) is needed; `transformers` is used by the tests only, to prove that this
code computes the same logits.
"""

import base64
import json
import math
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

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
               "rope_base", "rope_freq", "rms_norm_eps", "tie_embeddings", "dtype")


def check_config(cfg: dict) -> None:
    """Fail early, with a readable message, on a config the model cannot be built from."""
    missing = [key for key in CONFIG_KEYS if key not in cfg]
    if missing:
        raise ValueError(f"Config lacks {missing}; start from a full config such as LLAMA32_CONFIG_1B.")
    if cfg["emb_dim"] % cfg["n_heads"]:
        raise ValueError(f"emb_dim ({cfg['emb_dim']}) must be divisible by n_heads ({cfg['n_heads']}).")
    if (cfg["emb_dim"] // cfg["n_heads"]) % 2:
        raise ValueError("emb_dim / n_heads must be even: RoPE rotates pairs of features.")
    if cfg["n_heads"] % cfg["n_kv_groups"]:
        raise ValueError(f"n_heads ({cfg['n_heads']}) must be divisible by n_kv_groups ({cfg['n_kv_groups']}).")


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
    between, the two are blended linearly in (context / wavelength).
    """
    wavelength = 2 * math.pi / inv_freq
    turns = original_context_length / wavelength  # full turns within the original context
    blend = ((turns - low_freq_factor) / (high_freq_factor - low_freq_factor)).clamp(0.0, 1.0)
    return blend * inv_freq + (1 - blend) * inv_freq / factor


def compute_rope_params(head_dim: int, theta_base: float = 10_000.0, context_length: int = 4096,
                        freq_config: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every (position, feature) rotation angle, shape (context_length, head_dim).

    Feature pair i (features i and i + head_dim/2) turns by theta_base^(-2i/head_dim)
    radians per position. The tables live on the CPU even inside a `torch.device("meta")`
    block, so a model built there for weight loading still has real tables.
    """
    if head_dim % 2:
        raise ValueError(f"head_dim must be even, got {head_dim}")
    cpu = torch.device("cpu")
    inv_freq = 1.0 / theta_base ** (torch.arange(0, head_dim, 2, device=cpu, dtype=torch.float32) / head_dim)
    if freq_config is not None:
        inv_freq = scale_rope_frequencies(inv_freq, **freq_config)
    positions = torch.arange(context_length, device=cpu, dtype=torch.float32)
    angles = positions[:, None] * inv_freq[None, :]  # (context_length, head_dim // 2)
    angles = torch.cat([angles, angles], dim=1)      # the same angle for both halves of a pair
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
    """Rotate each (x[i], x[i + head_dim/2]) pair of x (batch, heads, tokens, head_dim) by its angle.

    Hugging Face's checkpoints pair feature i with i + head_dim/2 ("rotate half"); Meta's
    original checkpoints pair neighbours, and Hugging Face permuted the q/k weights to match.
    """
    num_tokens, half = x.shape[2], x.shape[3] // 2
    cos = cos[start_pos:start_pos + num_tokens].to(x.dtype)
    sin = sin[start_pos:start_pos + num_tokens].to(x.dtype)
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


#####################################
# Building blocks
#####################################

class RMSNorm(nn.Module):
    """Scale each token's features to unit root-mean-square, then by a learned weight.

    Unlike LayerNorm there is no mean subtraction and no shift: cheaper, and it works as
    well. The statistics are computed in float32 even for bfloat16 inputs.
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
        self.fc1 = nn.Linear(cfg["emb_dim"], cfg["hidden_dim"], bias=False, dtype=cfg["dtype"])
        self.fc2 = nn.Linear(cfg["emb_dim"], cfg["hidden_dim"], bias=False, dtype=cfg["dtype"])
        self.fc3 = nn.Linear(cfg["hidden_dim"], cfg["emb_dim"], bias=False, dtype=cfg["dtype"])

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


class GroupedQueryAttention(nn.Module):
    """Causal self-attention in which groups of query heads share one key/value head.

    With `num_kv_groups` key-value heads instead of `num_heads`, the key/value
    projections and the KV cache shrink by num_heads / num_kv_groups. With
    num_kv_groups == num_heads it is ordinary multi-head attention (Llama 2).
    """

    def __init__(self, d_in: int, num_heads: int, num_kv_groups: int, dtype: torch.dtype | None = None,
                 attn_impl: str = "sdpa"):
        super().__init__()
        if d_in % num_heads or num_heads % num_kv_groups:
            raise ValueError(f"need d_in % num_heads == 0 and num_heads % num_kv_groups == 0, got "
                             f"d_in={d_in}, num_heads={num_heads}, num_kv_groups={num_kv_groups}")
        if attn_impl not in ("sdpa", "manual"):
            raise ValueError(f"attn_impl must be 'sdpa' or 'manual', got {attn_impl!r}")
        self.num_heads = num_heads
        self.num_kv_groups = num_kv_groups
        self.head_dim = d_in // num_heads
        self.attn_impl = attn_impl
        self.W_query = nn.Linear(d_in, d_in, bias=False, dtype=dtype)
        self.W_key = nn.Linear(d_in, num_kv_groups * self.head_dim, bias=False, dtype=dtype)
        self.W_value = nn.Linear(d_in, num_kv_groups * self.head_dim, bias=False, dtype=dtype)
        self.out_proj = nn.Linear(d_in, d_in, bias=False, dtype=dtype)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: KVCache | None = None,
                layer: int = 0) -> torch.Tensor:
        b, num_tokens, d = x.shape
        start_pos = kv_cache.pos if kv_cache is not None else 0
        queries = self.W_query(x).view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        keys = self.W_key(x).view(b, num_tokens, self.num_kv_groups, self.head_dim).transpose(1, 2)
        values = self.W_value(x).view(b, num_tokens, self.num_kv_groups, self.head_dim).transpose(1, 2)

        queries = apply_rope(queries, cos, sin, start_pos)
        keys = apply_rope(keys, cos, sin, start_pos)
        if kv_cache is not None:
            keys, values = kv_cache.update(layer, keys, values)

        # Each key/value head serves num_heads / num_kv_groups consecutive query heads.
        group_size = self.num_heads // self.num_kv_groups
        keys = keys.repeat_interleave(group_size, dim=1)
        values = values.repeat_interleave(group_size, dim=1)

        # A query at position p may look at keys 0..p. Only a multi-token chunk after
        # cached positions needs an explicit mask: one token sees everything cached, and a
        # chunk starting at 0 is the plain causal triangle.
        mask = None
        if num_tokens > 1 and start_pos > 0:
            q_pos = torch.arange(start_pos, start_pos + num_tokens, device=x.device)
            mask = torch.arange(keys.shape[2], device=x.device)[None, :] <= q_pos[:, None]
        is_causal = num_tokens > 1 and start_pos == 0
        if self.attn_impl == "sdpa":
            context = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, is_causal=is_causal)
        else:
            context = attention_manual(queries, keys, values, mask, is_causal)
        return self.out_proj(context.transpose(1, 2).reshape(b, num_tokens, d))


def attention_manual(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
                     is_causal: bool) -> torch.Tensor:
    """softmax(QK^T / sqrt(d)) V written out, as in chapter 3 (the benchmark's baseline)."""
    scores = queries @ keys.transpose(2, 3) / queries.shape[-1] ** 0.5
    if is_causal:
        n_q, n_k = scores.shape[-2:]
        mask = torch.ones(n_q, n_k, dtype=torch.bool, device=scores.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, -torch.inf)
    return torch.softmax(scores.float(), dim=-1).to(values.dtype) @ values


class TransformerBlock(nn.Module):
    """x + attention(RMSNorm(x)), then x + SwiGLU(RMSNorm(x)); no dropout."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.att = GroupedQueryAttention(cfg["emb_dim"], cfg["n_heads"], cfg["n_kv_groups"], dtype=cfg["dtype"],
                                         attn_impl=cfg.get("attn_impl", "sdpa"))
        self.ff = FeedForward(cfg)
        self.norm1 = RMSNorm(cfg["emb_dim"], eps=cfg["rms_norm_eps"], dtype=cfg["dtype"])
        self.norm2 = RMSNorm(cfg["emb_dim"], eps=cfg["rms_norm_eps"], dtype=cfg["dtype"])

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: KVCache | None = None,
                layer: int = 0) -> torch.Tensor:
        x = x + self.att(self.norm1(x), cos, sin, kv_cache, layer)
        return x + self.ff(self.norm2(x))


class Llama3Model(nn.Module):
    """Token embedding, `n_layers` blocks, a final RMSNorm and the output head.

    No position embedding layer: positions enter through RoPE inside attention. With
    `tie_embeddings` the output head *is* the embedding matrix (one Parameter, stored
    once), as in Llama 3.2 1B/3B.
    """

    def __init__(self, cfg: dict):
        super().__init__()
        check_config(cfg)
        self.cfg = dict(cfg)
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

    def forward(self, in_idx: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        """Logits (batch, tokens, vocab). With `kv_cache`, `in_idx` holds only the new tokens."""
        start_pos = kv_cache.pos if kv_cache is not None else 0
        if start_pos + in_idx.shape[1] > self.cfg["context_length"]:
            raise ValueError(f"{start_pos + in_idx.shape[1]} positions exceed the context length "
                             f"{self.cfg['context_length']}; shorten the input or raise context_length.")
        x = self.tok_emb(in_idx)
        for layer, block in enumerate(self.trf_blocks):
            x = block(x, self.cos, self.sin, kv_cache, layer)
        if kv_cache is not None:
            kv_cache.pos += in_idx.shape[1]
        return self.out_head(self.final_norm(x))


def count_parameters(model: nn.Module) -> int:
    """Parameters stored, counting a tied embedding/output matrix once."""
    return sum(p.numel() for p in model.parameters())  # .parameters() yields a shared Parameter once


#####################################
# Generation
#####################################

def _next_token(logits: torch.Tensor, temperature: float, top_k: int | None,
                generator: torch.Generator | None) -> torch.Tensor:
    if top_k is not None:
        kth_largest = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, -torch.inf)
    if temperature > 0.0:
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        return torch.multinomial(probs, num_samples=1, generator=generator)
    return torch.argmax(logits, dim=-1, keepdim=True)


@torch.no_grad()
def generate(model: Llama3Model, idx: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, eos_id: int | None = None, use_cache: bool = True,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Extend each row of `idx` (batch, n_tokens) by up to `max_new_tokens` tokens.

    Same rules as the chapter's `generate` (temperature 0 = greedy, optional top-k,
    rows that produced `eos_id` are padded with it). With `use_cache` the prompt is run
    once and every later step feeds only the newest token; without it, every step
    re-reads the whole text (cropped to the context length), as in chapter 4.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    context_length = model.cfg["context_length"]
    kv_cache = None
    if use_cache:
        max_len = min(idx.shape[1] + max_new_tokens, context_length)
        if idx.shape[1] >= max_len and max_new_tokens > 0:
            raise ValueError(f"The prompt ({idx.shape[1]} tokens) leaves no room in the context length "
                             f"{context_length}; shorten it.")
        kv_cache = KVCache(model.cfg, idx.shape[0], max_len, device=idx.device, dtype=model.tok_emb.weight.dtype)
    finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    new_input = idx
    for _ in range(max_new_tokens):
        if kv_cache is not None and kv_cache.pos >= kv_cache.max_len:
            break  # the context is full
        logits = model(new_input if use_cache else idx[:, -context_length:], kv_cache)[:, -1, :]
        idx_next = _next_token(logits, temperature, top_k, generator)
        if eos_id is not None:
            idx_next = idx_next.masked_fill(finished.unsqueeze(1), eos_id)
            finished |= idx_next.squeeze(1) == eos_id
        idx = torch.cat((idx, idx_next), dim=1)
        new_input = idx_next
        if eos_id is not None and finished.all():
            break
    return idx


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
    """Read a tiktoken BPE file: one `base64(token) rank` pair per line (Meta's tokenizer.model)."""
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
                             "tokenizer.model (Llama 2's is a sentencepiece file: use Llama2Tokenizer)?") from None
    return ranks


class Llama3Tokenizer:
    """Llama 3's tokenizer: tiktoken BPE over 128,000 ranks plus 256 special tokens after them."""

    def __init__(self, model_path: str | Path):
        import tiktoken

        ranks = read_tiktoken_ranks(model_path)
        self.special_tokens = {name: len(ranks) + i for i, name in enumerate(LLAMA3_SPECIAL_TOKENS)}
        self.model = tiktoken.Encoding(name=Path(model_path).name, pat_str=LLAMA3_SPLIT_PATTERN,
                                       mergeable_ranks=ranks, special_tokens=self.special_tokens)
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.eot_id = self.special_tokens["<|eot_id|>"]
        self.n_vocab = self.model.n_vocab

    def encode(self, text: str, bos: bool = False, eos: bool = False,
               allowed_special: set[str] | frozenset[str] = frozenset()) -> list[int]:
        """Token ids of `text`. Special-token strings in it are plain text unless listed in `allowed_special`,
        so user input cannot forge `<|eot_id|>` and the like."""
        ids = self.model.encode(text, allowed_special=set(allowed_special), disallowed_special=())
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids: list[int]) -> str:
        return self.model.decode(ids)


class ChatFormat:
    """Llama 3's chat layout:

        <|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\n{system}<|eot_id|>
        <|start_header_id|>user<|end_header_id|>\\n\\n{question}<|eot_id|>
        <|start_header_id|>assistant<|end_header_id|>\\n\\n      <- the model continues here

    (without the line breaks drawn above). The model ends its turn with <|eot_id|>.
    """

    def __init__(self, tokenizer: Llama3Tokenizer):
        self.tokenizer = tokenizer

    def encode_header(self, role: str) -> list[int]:
        t = self.tokenizer
        return ([t.special_tokens["<|start_header_id|>"]] + t.encode(role)
                + [t.special_tokens["<|end_header_id|>"]] + t.encode("\n\n"))

    def encode_message(self, role: str, content: str) -> list[int]:
        return self.encode_header(role) + self.tokenizer.encode(content.strip()) + [self.tokenizer.eot_id]

    def encode_dialog(self, messages: list[dict]) -> list[int]:
        """[{"role": "system"|"user"|"assistant", "content": ...}, ...] -> a prompt ending in the assistant header."""
        ids = [self.tokenizer.bos_id]
        for message in messages:
            if set(message) != {"role", "content"}:
                raise ValueError(f"Each message needs exactly 'role' and 'content', got {sorted(message)}")
            ids += self.encode_message(message["role"], message["content"])
        return ids + self.encode_header("assistant")

    def decode_reply(self, ids: list[int]) -> str:
        """The assistant's text: everything generated before its <|eot_id|> (or end of text)."""
        for stop in (self.tokenizer.eot_id, self.tokenizer.eos_id):
            if stop in ids:
                ids = ids[:ids.index(stop)]
        return self.tokenizer.decode(ids).strip()


class Llama2Tokenizer:
    """Llama 2's sentencepiece tokenizer (32,000 pieces, byte fallback); BOS/EOS are ids, not text."""

    def __init__(self, model_path: str | Path):
        import sentencepiece as spm

        if not Path(model_path).is_file():
            raise FileNotFoundError(f"Tokenizer file not found: {model_path}. For Llama 2 it is tokenizer.model "
                                    "in the Hugging Face repository.")
        self.sp = spm.SentencePieceProcessor(model_file=str(model_path))
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.n_vocab = self.sp.get_piece_size()

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        return [self.bos_id] * bos + self.sp.encode(text) + [self.eos_id] * eos

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)


def format_llama2_chat(user_message: str, system_prompt: str | None = None) -> str:
    """Llama 2 chat's single-turn prompt; encode it with bos=True."""
    user_message = user_message.strip()
    if system_prompt:
        user_message = f"<<SYS>>\n{system_prompt.strip()}\n<</SYS>>\n\n{user_message}"
    return f"[INST] {user_message} [/INST]"


#####################################
# Hugging Face checkpoints
#####################################

# Hugging Face's parameter names -> ours, per layer and for the rest.
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


def hf_to_our_name(hf_name: str) -> str | None:
    """Our parameter name for a Hugging Face Llama tensor name (None if it is not a Llama weight)."""
    if hf_name in HF_OTHER_NAMES:
        return HF_OTHER_NAMES[hf_name]
    parts = hf_name.split(".", 3)  # model, layers, i, rest
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit() and parts[3] in HF_LAYER_NAMES:
        return f"trf_blocks.{parts[2]}.{HF_LAYER_NAMES[parts[3]]}"
    return None


def config_from_hf(hf_config: dict, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Our config dict from a Hugging Face Llama `config.json` (rope keys of transformers 4.x and 5.x)."""
    rope = hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise ValueError(f"RoPE type {rope_type!r} is not a Llama 2/3 RoPE; this code supports 'default' and 'llama3'.")
    head_dim = hf_config.get("head_dim") or hf_config["hidden_size"] // hf_config["num_attention_heads"]
    if head_dim * hf_config["num_attention_heads"] != hf_config["hidden_size"]:
        raise ValueError("head_dim * num_attention_heads != hidden_size: not supported by this code.")
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
        "rms_norm_eps": hf_config["rms_norm_eps"],
        "tie_embeddings": hf_config.get("tie_word_embeddings", False),
        "dtype": dtype,
    }


def safetensors_files(checkpoint_dir: str | Path) -> list[Path]:
    """The weight files of a Hugging Face checkpoint folder: every shard named in its index, or the single file."""
    checkpoint_dir = Path(checkpoint_dir)
    index = checkpoint_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [checkpoint_dir / name for name in shards]
    else:
        files = [checkpoint_dir / "model.safetensors"]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"Checkpoint files missing: {missing}. Download the checkpoint again "
                                "(download_llama_checkpoint) or check the folder.")
    return files


def _set_parameter(model: nn.Module, name: str, tensor: torch.Tensor, hf_name: str) -> None:
    module_name, attr = name.rsplit(".", 1)
    module = model.get_submodule(module_name)
    old = getattr(module, attr)
    if old.shape != tensor.shape:
        raise ValueError(f"{hf_name} has shape {tuple(tensor.shape)} in the checkpoint but {name} has "
                         f"{tuple(old.shape)} in the model: the config does not fit this checkpoint "
                         "(e.g. LLAMA32_CONFIG_3B for a 3B checkpoint, or build it with config_from_hf).")
    setattr(module, attr, nn.Parameter(tensor, requires_grad=False))


def load_llama_from_safetensors(cfg: dict, files: list[str | Path], device: torch.device | str = "cpu") -> Llama3Model:
    """Build a Llama3Model for `cfg` and fill it from Hugging Face safetensors `files`.

    Low peak memory: the model is first built on the "meta" device (shapes, no storage),
    then each tensor is read from the memory-mapped file, converted to cfg["dtype"],
    moved to `device` and installed, one at a time. So the process never holds a second
    full copy of the weights (the naive way, a random-initialized model plus a loaded
    state dict, needs two). Tied models get their output head re-tied to the embedding.
    """
    from safetensors import safe_open

    with torch.device("meta"):
        model = Llama3Model(cfg)
    expected = {name for name, _ in model.named_parameters()}  # a tied head appears once, as tok_emb.weight
    loaded = set()
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for hf_name in f.keys():
                name = hf_to_our_name(hf_name)
                if name is None:
                    if hf_name.endswith("rotary_emb.inv_freq"):
                        continue  # old checkpoints store the RoPE frequencies, which we compute
                    raise ValueError(f"Unexpected tensor {hf_name} in {path}: is this a Llama checkpoint, and "
                                     f"does n_layers={cfg['n_layers']} match it?")
                if name == "out_head.weight" and cfg["tie_embeddings"]:
                    continue  # the same matrix as the embedding
                if name not in expected:
                    raise ValueError(f"{hf_name} has no place in a model with this config (n_layers="
                                     f"{cfg['n_layers']}, tie_embeddings={cfg['tie_embeddings']}).")
                _set_parameter(model, name, f.get_tensor(hf_name).to(device=device, dtype=cfg["dtype"]), hf_name)
                loaded.add(name)
    missing = sorted(expected - loaded)
    if missing:
        raise ValueError(f"The checkpoint lacks {len(missing)} tensor(s) the model needs, e.g. {missing[:3]}; "
                         "the files are incomplete or the config has too many layers.")
    if cfg["tie_embeddings"]:
        model.out_head.weight = model.tok_emb.weight
    model.cos, model.sin = model.cos.to(device), model.sin.to(device)
    return model.eval()


GATED_HELP = ("Meta's Llama weights are gated on Hugging Face: log in at https://huggingface.co/{repo}, accept "
              "the license, create an access token (https://huggingface.co/settings/tokens) and pass it as "
              "`token=` or set the HF_TOKEN environment variable.")


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
                          device: torch.device | str = "cpu", context_length: int | None = None) -> Llama3Model:
    """A model from a downloaded Hugging Face folder, configured by its config.json.

    `context_length` may shorten the RoPE tables (the full 131,072 positions take
    64-128 MB) when you know you need fewer positions.
    """
    checkpoint_dir = Path(checkpoint_dir)
    config_path = checkpoint_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"No config.json in {checkpoint_dir}: not a Hugging Face checkpoint folder.")
    cfg = config_from_hf(json.loads(config_path.read_text()), dtype=dtype)
    if context_length is not None:
        cfg["context_length"] = min(context_length, cfg["context_length"])
    return load_llama_from_safetensors(cfg, safetensors_files(checkpoint_dir), device=device)
