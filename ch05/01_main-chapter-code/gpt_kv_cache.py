"""GPT-2 text generation with a key-value (KV) cache, for the chat apps of this folder.

The chapter's `generate` runs the whole sequence through the model for every new token,
so token number t costs a forward pass over t positions. But the keys and values that
attention computes for the earlier positions never change: position i only looks at
positions <= i. A KV cache keeps them, so each new token needs one forward step over
ONE position (its own query, key and value), which attends to the cached keys and values.

`GPTModelKV` is the chapter's `GPTModel` with the same parameters (it loads a GPTModel
state dict as is) and a second way to run: `model(idx, cache)` processes only the new
tokens and extends `cache`. Without a cache it is exactly the chapter's model.

The cache belongs to one generation, not to the model, so several chat sessions can
generate with the same model at the same time.
"""

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from previous_chapters import GPTModel, LayerNorm, MultiHeadAttention, TransformerBlock


class KVCache:
    """The keys and values of every layer for the tokens seen so far (one batch).

    Memory is allocated once, for `capacity` positions, and filled in place: appending
    with `torch.cat` would copy the whole cache at every step.
    """

    def __init__(self, n_layers: int, batch_size: int, n_heads: int, head_dim: int, capacity: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        shape = (n_layers, batch_size, n_heads, capacity, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.capacity = capacity
        self.length = 0  # positions filled so far

    def reset(self) -> None:
        """Forget every position (the memory is kept and overwritten)."""
        self.length = 0


def _layer_norm(x: torch.Tensor, norm: LayerNorm) -> torch.Tensor:
    """The chapter's LayerNorm (biased variance, same eps) as one fused kernel."""
    return F.layer_norm(x, (x.shape[-1],), norm.scale, norm.shift, norm.eps)


def _attention_step(att: MultiHeadAttention, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                    start: int) -> torch.Tensor:
    """Causal attention of the new tokens `x` (positions start, start+1, ...) over the cache.

    `keys` and `values` are this layer's cache tensors (batch, heads, capacity, head_dim);
    the new tokens' keys and values are written into them first.
    """
    b, n, _ = x.shape
    end = start + n
    queries = att.W_query(x).view(b, n, att.num_heads, att.head_dim).transpose(1, 2)
    keys[:, :, start:end] = att.W_key(x).view(b, n, att.num_heads, att.head_dim).transpose(1, 2)
    values[:, :, start:end] = att.W_value(x).view(b, n, att.num_heads, att.head_dim).transpose(1, 2)
    # A single new token may look at every cached position; several new tokens also
    # need the causal mask among themselves (the chapter's mask, shifted by `start`).
    allowed = None if n == 1 else ~att.mask[start:end, :end]
    context = F.scaled_dot_product_attention(queries, keys[:, :, :end], values[:, :, :end], attn_mask=allowed)
    return att.out_proj(context.transpose(1, 2).reshape(b, n, att.d_out))


def _block_step(block: TransformerBlock, x: torch.Tensor, cache: KVCache, layer: int, start: int) -> torch.Tensor:
    """One transformer block for the new tokens (no dropout: this path is for inference)."""
    x = x + _attention_step(block.att, _layer_norm(x, block.norm1), cache.keys[layer], cache.values[layer], start)
    expand, _, project = block.ff.layers
    hidden = F.gelu(expand(_layer_norm(x, block.norm2)), approximate="tanh")  # the chapter's GELU formula
    return x + project(hidden)


class GPTModelKV(GPTModel):
    """The chapter's GPTModel plus a forward pass that reads and extends a KV cache."""

    @property
    def context_length(self) -> int:
        return self.pos_emb.num_embeddings

    def new_cache(self, batch_size: int = 1, capacity: int | None = None) -> KVCache:
        """An empty cache for up to `capacity` positions (default: the context length)."""
        capacity = self.context_length if capacity is None else capacity
        if not 1 <= capacity <= self.context_length:
            raise ValueError(f"capacity must be between 1 and the context length {self.context_length}, "
                             f"got {capacity}")
        att = self.trf_blocks[0].att
        weight = self.tok_emb.weight
        return KVCache(len(self.trf_blocks), batch_size, att.num_heads, att.head_dim, capacity,
                       device=weight.device, dtype=weight.dtype)

    def forward(self, in_idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Logits for every position of `in_idx`.

        Without `cache`: the chapter's forward pass over the whole sequence. With one:
        `in_idx` holds only the NEW tokens, which continue the `cache.length` tokens the
        cache already holds; their keys and values are added to it.
        """
        if cache is None:
            return super().forward(in_idx)
        return self.out_head(self._hidden_step(in_idx, cache))

    def next_token_logits(self, in_idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Like `forward(in_idx, cache)`, but only the last position's logits (batch, vocab).

        The output head is the largest matrix of the model; when reading a prompt, the
        logits of the earlier positions are not needed, so skipping them saves time.
        """
        return self.out_head(self._hidden_step(in_idx, cache)[:, -1, :])

    def _hidden_step(self, in_idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        if self.training:
            raise RuntimeError("The KV-cache forward pass is for inference: call model.eval() first "
                               "(it skips dropout).")
        start, n = cache.length, in_idx.shape[1]
        if start + n > cache.capacity:
            raise ValueError(f"The cache holds {start} of {cache.capacity} positions; {n} more do not fit. "
                             "Start a new cache (generate_stream slides the window for you).")
        positions = torch.arange(start, start + n, device=in_idx.device)
        x = self.tok_emb(in_idx) + self.pos_emb(positions)
        for layer, block in enumerate(self.trf_blocks):
            x = _block_step(block, x, cache, layer, start)
        cache.length = start + n
        return _layer_norm(x, self.final_norm)


def sample_next_token(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                      top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token id for each row of `logits` (batch, vocab); returns (batch, 1).

    temperature 0 is greedy decoding. Otherwise the logits are filtered by `top_k` (keep
    the k most likely tokens) and `top_p` (keep the smallest set of most likely tokens
    whose probabilities add up to at least p, "nucleus sampling"), then sampled from
    softmax(logits / temperature). Without top_p this draws exactly what the chapter's
    `generate` draws from the same generator state.
    """
    if temperature == 0.0:
        return torch.argmax(logits, dim=-1, keepdim=True)
    if top_k is not None:
        kth_largest = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, -torch.inf)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        # Drop a token when the more likely tokens before it already reach top_p
        # (so the most likely token always stays).
        drop_sorted = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        probs = probs.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return torch.multinomial(probs, num_samples=1, generator=generator)


@torch.inference_mode()
def generate_stream(model: GPTModelKV, token_ids: list[int], max_new_tokens: int, temperature: float = 0.0,
                    top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
                    generator: torch.Generator | None = None) -> Iterator[int]:
    """Yield up to `max_new_tokens` new token ids continuing `token_ids`, one at a time.

    The prompt is read in one forward pass that fills the cache; after that every token
    costs one step over one position. Like the chapter's `generate`, the model only ever
    sees the last `context_length` tokens: when the cache is full, the window slides by
    rebuilding the cache from the last `context_length` tokens (one full pass per token
    from then on, which is why the apps leave room for the reply in the window).
    Generation stops after `eos_id` (which is yielded).
    """
    if not token_ids:
        raise ValueError("The prompt is empty: pass at least one token id.")
    if max_new_tokens < 1:
        return
    device = model.tok_emb.weight.device
    ctx = model.context_length
    tokens = list(token_ids)
    cache = model.new_cache(capacity=min(ctx, len(tokens) + max_new_tokens))
    logits = model.next_token_logits(torch.tensor([tokens[-ctx:]], device=device), cache)
    for step in range(max_new_tokens):
        next_id = sample_next_token(logits, temperature, top_k, top_p, generator).item()
        yield next_id
        if next_id == eos_id or step == max_new_tokens - 1:
            return
        tokens.append(next_id)
        if cache.length == cache.capacity:  # window full: slide it by one token
            cache.reset()
            logits = model.next_token_logits(torch.tensor([tokens[-ctx:]], device=device), cache)
        else:
            logits = model.next_token_logits(torch.tensor([[next_id]], device=device), cache)


def generate_kv(model: GPTModelKV, idx: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """`generate_stream` collected into a (1, n_tokens) tensor, like the chapter's `generate`."""
    if idx.shape[0] != 1:
        raise ValueError(f"generate_kv decodes one sequence at a time, got a batch of {idx.shape[0]}")
    new = list(generate_stream(model, idx[0].tolist(), max_new_tokens, temperature, top_k, top_p, eos_id, generator))
    return torch.cat([idx, torch.tensor([new], dtype=idx.dtype, device=idx.device)], dim=1)
