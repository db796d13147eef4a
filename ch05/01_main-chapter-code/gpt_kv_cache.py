"""GPT-2 text generation with a key-value (KV) cache, fast enough to be limited by memory.

The chapter's `generate` runs the whole sequence through the model for every new token,
so token number t costs a forward pass over t positions. But the keys and values that
attention computes for the earlier positions never change: position i only looks at
positions <= i. A KV cache keeps them, so each new token needs one forward step over
ONE position (its own query, key and value), which attends to the cached keys and values.

Such a step multiplies one vector by every weight matrix of the model, so it reads every
weight once and does only two floating-point operations per weight read: its speed limit
is how fast the machine reads memory, not how fast it computes. Three things here get a
step close to that limit (`ui_generation_benchmark.py` in 06_user_interface measures it):

- The one-token step is compiled with `torch.compile` into a few fused loops per block:
  each matrix-vector product becomes one pass over the weights, with the layer norms,
  GELU and residual additions fused around it, instead of a BLAS call designed for large
  matrices plus a dozen small kernels, each launched from Python.
- An optional weight-only int8 mode (`int8=True`) stores each weight matrix as int8 with
  one float scale per output channel, so a step reads a quarter of the bytes.
- Several sequences can advance together (`decode_rows`): one pass over the weights then
  serves all of them, which is how the chat apps serve several sessions at once.

`GPTModelKV` is the chapter's `GPTModel` with the same parameters (it loads a GPTModel
state dict as is) and a second way to run: `model(idx, cache)` processes only the new
tokens and extends `cache`. Without a cache it is exactly the chapter's model. The cache
belongs to one generation, not to the model, so several generations can share a model.

Shared file. The canonical copy is ch05/01_main-chapter-code/gpt_kv_cache.py; `make sync`
(scripts/sync_shared_code.py) overwrites the copies in the other ch05 folders with it.
"""

import math
import os
import sys
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from previous_chapters import GPTModel

COMPILE_ENV = "CH05_COMPILE"  # "0" switches torch.compile off (the plain PyTorch path is used)
DECODE_THREADS_ENV = "CH05_DECODE_THREADS"  # threads for decoding (default: see decode_threads)


#####################################
# The cache
#####################################

class KVCache:
    """The keys and values of every layer for the tokens seen so far (`batch_size` rows).

    Memory is allocated once, for `capacity` positions, and filled in place: appending
    with `torch.cat` would copy the whole cache at every step. `length` counts the
    positions filled so far when all rows advance together (one generation);
    `decode_rows` lets each row advance on its own and leaves the bookkeeping to its caller.
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

    def rows(self, start: int, stop: int) -> "KVCache":
        """A cache of rows start..stop-1 that shares their memory (filling it fills this cache)."""
        view = KVCache.__new__(KVCache)
        view.keys, view.values = self.keys[:, start:stop], self.values[:, start:stop]
        view.capacity, view.length = self.capacity, 0
        return view


def new_cache(model: GPTModel, batch_size: int = 1, capacity: int | None = None) -> KVCache:
    """An empty cache for `model`, for up to `capacity` positions (default: its context length)."""
    context_length = model.pos_emb.num_embeddings
    capacity = context_length if capacity is None else capacity
    if not 1 <= capacity <= context_length:
        raise ValueError(f"capacity must be between 1 and the context length {context_length}, got {capacity}")
    att = model.trf_blocks[0].att
    weight = model.tok_emb.weight
    return KVCache(len(model.trf_blocks), batch_size, att.num_heads, att.head_dim, capacity,
                   device=weight.device, dtype=weight.dtype)


#####################################
# The weights one step reads (float32, or int8 with scales)
#####################################

class LinearWeights(NamedTuple):
    """A linear layer for inference. `weight` is (out, in), float or int8; an int8
    weight's true value is `weight * scale[:, None]` (one scale per output channel).
    `packed` is an optional copy of a float weight in the layout oneDNN's matrix
    products read fastest (see `inference_weights`)."""
    weight: torch.Tensor
    bias: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    packed: torch.Tensor | None = None


class BlockWeights(NamedTuple):
    """What one transformer block reads; norms are (scale, shift) pairs."""
    norm1: tuple[torch.Tensor, torch.Tensor]
    query: LinearWeights
    key: LinearWeights
    value: LinearWeights
    out_proj: LinearWeights
    norm2: tuple[torch.Tensor, torch.Tensor]
    expand: LinearWeights
    project: LinearWeights


class InferenceWeights(NamedTuple):
    """Every tensor a forward step reads, gathered once from a GPTModel."""
    tok_emb: torch.Tensor
    pos_emb: torch.Tensor
    blocks: tuple[BlockWeights, ...]
    final_norm: tuple[torch.Tensor, torch.Tensor]
    head: LinearWeights
    n_heads: int
    eps: float
    int8: bool


def quantize_int8(weight: torch.Tensor, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel: row i becomes round(w / s_i) with s_i = max|w_i| / 127.

    One scale per row keeps a row of small weights precise even where another row holds
    large ones. Raises ValueError for weights that have no int8 form (NaN or infinity).
    """
    if not weight.dtype.is_floating_point:
        raise ValueError(f"int8 mode: {name} has dtype {weight.dtype}, not a float; it cannot be quantized.")
    weight = weight.detach().float()
    if not torch.isfinite(weight).all():
        raise ValueError(f"int8 mode: {name} holds NaN or infinite values, which int8 cannot represent. "
                         "The model is broken: load a good checkpoint.")
    scale = weight.abs().amax(dim=1) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row stays zero
    quantized = torch.round(weight / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return quantized, scale


def _check_quantizable(model: nn.Module) -> None:
    """Refuse, in one line, a model that int8 mode cannot serve."""
    if not isinstance(model, GPTModel):
        raise ValueError(f"int8 mode supports the chapter's GPTModel, not {type(model).__name__}.")
    for name, module in model.named_modules():
        if name.endswith(("W_query", "W_key", "W_value", "out_proj", "ff.layers.0", "ff.layers.2", "out_head")) \
                and type(module) is not nn.Linear:
            raise ValueError(f"int8 mode: {name} is a {type(module).__name__}, not a plain nn.Linear "
                             "(merge adapters such as LoRA into the weights first).")
    weight = model.tok_emb.weight
    if weight.is_meta:
        raise ValueError("int8 mode: the model's weights were never loaded (they are on the meta device).")
    if weight.dtype != torch.float32:
        raise ValueError(f"int8 mode quantizes float32 models; this one is {weight.dtype}: call model.float().")


def packing_available(model: GPTModel) -> bool:
    """Whether oneDNN can hold this model's weights in its own layout (float32 on a CPU)."""
    weight = model.tok_emb.weight
    return (weight.device.type == "cpu" and weight.dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


PACK_ROWS = 8  # oneDNN picks its weight layout for products with about this many rows


def _linear_weights(layer: nn.Linear, kind: str, name: str) -> LinearWeights:
    if kind == "float":
        return LinearWeights(layer.weight, layer.bias)
    if kind == "packed":
        packed = torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach(), PACK_ROWS)
        return LinearWeights(layer.weight, layer.bias, packed=packed)
    quantized, scale = quantize_int8(layer.weight, name)
    return LinearWeights(quantized, layer.bias, scale.to(layer.weight.dtype))


def _gather_weights(model: GPTModel, kind: str) -> InferenceWeights:
    blocks = []
    for i, block in enumerate(model.trf_blocks):
        att, (expand, _, project) = block.att, block.ff.layers

        def lin(layer: nn.Linear, part: str, i=i) -> LinearWeights:
            return _linear_weights(layer, kind, f"trf_blocks.{i}.{part}.weight")

        blocks.append(BlockWeights(
            (block.norm1.scale, block.norm1.shift), lin(att.W_query, "att.W_query"), lin(att.W_key, "att.W_key"),
            lin(att.W_value, "att.W_value"), lin(att.out_proj, "att.out_proj"), (block.norm2.scale, block.norm2.shift),
            lin(expand, "ff.layers.0"), lin(project, "ff.layers.2")))
    return InferenceWeights(
        model.tok_emb.weight, model.pos_emb.weight, tuple(blocks), (model.final_norm.scale, model.final_norm.shift),
        _linear_weights(model.out_head, kind, "out_head.weight"), model.trf_blocks[0].att.num_heads,
        model.final_norm.eps, kind == "int8")


def inference_weights(model: GPTModel, *, int8: bool = False, packed: bool = False) -> InferenceWeights:
    """The tensors a forward step reads: the model's own (float32), or int8 copies.

    `packed=True` adds a copy of every float matrix in oneDNN's layout, which multiplies
    several rows at once about twice as fast as the BLAS library on some CPUs; it costs
    as much memory as the weights, so only batched serving asks for it (and only where
    `packing_available`). Copies are made once and kept on the model until one of its
    parameters is replaced or changed in place (for example by `load_state_dict`).
    Raises ValueError for a model that int8 mode cannot quantize.
    """
    if int8:
        _check_quantizable(model)
        kind = "int8"
    else:
        kind = "packed" if packed and packing_available(model) else "float"
    if kind == "float":
        return _gather_weights(model, kind)
    version = tuple((id(p), p._version) for p in model.parameters())
    stored = model.__dict__.setdefault("_inference_weights", {})
    if kind not in stored or stored[kind][0] != version:
        stored.pop(kind, None)  # free the stale copy before making a new one
        with torch.no_grad():
            stored[kind] = (version, _gather_weights(model, kind))
    return stored[kind][1]


#####################################
# The forward pass over new tokens
#####################################

def _linear(x: torch.Tensor, lin: LinearWeights) -> torch.Tensor:
    """x @ weight.T (+ bias), for float or int8 weights.

    Compiled (one token), the product is written as a multiply-and-sum, which
    torch.compile turns into a single loop that streams the weight once (converting
    int8 on the fly). In plain PyTorch, F.linear calls the BLAS library, or oneDNN for
    weights packed in its layout; int8 weights go through `_int8_linear`.
    """
    weight = lin.weight
    if lin.packed is not None and not torch.compiler.is_compiling():
        return torch.ops.mkldnn._linear_pointwise(x, lin.packed, lin.bias, "none", [], "")
    if weight.dtype != torch.int8 and not torch.compiler.is_compiling():
        return F.linear(x, weight, lin.bias)  # exactly what the chapter's nn.Linear computes
    if torch.compiler.is_compiling():
        y = _multiply_and_sum(x, weight)
    else:
        y = _int8_linear(x, weight)
    if lin.scale is not None:
        y = y * lin.scale
    return y if lin.bias is None else y + lin.bias


INT8_ROWS_PER_BLOCK = 256  # float rows converted at a time: a block stays in the CPU's cache


def _int8_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T for an int8 `weight` in plain PyTorch (the prompt's pass, or no compiler).

    Converting the whole matrix to float first would write and read a fresh float copy
    of it, costing more than the float model itself (2.7 s for GPT-2 1558M's prompt
    here). Converting a block of rows at a time into one small buffer keeps the float
    rows in the cache, so the products cost about what the float model's do.
    """
    rows, k = weight.shape
    out = x.new_empty(*x.shape[:-1], rows)
    block = x.new_empty(min(rows, INT8_ROWS_PER_BLOCK), k)
    for start in range(0, rows, INT8_ROWS_PER_BLOCK):
        part = block[:min(INT8_ROWS_PER_BLOCK, rows - start)]
        part.copy_(weight[start:start + INT8_ROWS_PER_BLOCK])
        out[..., start:start + len(part)] = x @ part.T
    return out


INDUCTOR_PLAIN_SUM_MAX = 4096  # longer float sums get Inductor's cascade summation, 2-3x slower here


def _multiply_and_sum(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T written for torch.compile: one loop that streams each weight row once.

    Inductor sums a row longer than 4,096 with a more exact but much slower cascade
    (GPT-2 774M and 1558M have rows of 5,120 and 6,400 in the feed-forward projection),
    so such a row is summed as equal chunks of at most 4,096, then the chunk sums added.
    """
    k = weight.shape[-1]
    chunks = -(-k // INDUCTOR_PLAIN_SUM_MAX)
    if chunks == 1 or k % chunks:
        return (x.unsqueeze(-2) * weight).sum(-1)
    x = x.unflatten(-1, (chunks, k // chunks)).unsqueeze(-3)
    return (x * weight.view(weight.shape[0], chunks, k // chunks)).sum(-1).sum(-1)


def _layer_norm(x: torch.Tensor, norm: tuple[torch.Tensor, torch.Tensor], eps: float) -> torch.Tensor:
    """The chapter's LayerNorm (biased variance, same eps) as one fused kernel."""
    return F.layer_norm(x, (x.shape[-1],), norm[0], norm[1], eps)


def _feed_forward(x: torch.Tensor, block: BlockWeights, eps: float) -> torch.Tensor:
    """x + MLP(norm2(x)), with the chapter's GELU formula (the tanh approximation)."""
    hidden = F.gelu(_linear(_layer_norm(x, block.norm2, eps), block.expand), approximate="tanh")
    return x + _linear(hidden, block.project)


def _block_tokens(x: torch.Tensor, block: BlockWeights, keys: torch.Tensor, values: torch.Tensor,
                  start: int, n_heads: int, eps: float) -> torch.Tensor:
    """One block for n new tokens of every row, at positions start, start+1, ... (all rows alike).

    `keys`/`values` are this layer's cache (batch, heads, capacity, head_dim); the new
    tokens' keys and values are written into them first.
    """
    b, n, emb = x.shape
    end, head_dim = start + n, emb // n_heads
    h = _layer_norm(x, block.norm1, eps)
    q, k, v = (_linear(h, lin).view(b, n, n_heads, head_dim).transpose(1, 2)
               for lin in (block.query, block.key, block.value))
    keys[:, :, start:end], values[:, :, start:end] = k, v
    # A single new token may look at every cached position; several new tokens also
    # need the causal mask among themselves (True where a position is hidden).
    hidden = None if n == 1 else torch.ones(n, end, dtype=torch.bool, device=x.device).triu(start + 1)
    context = F.scaled_dot_product_attention(q, keys[:, :, :end], values[:, :, :end],
                                             attn_mask=None if hidden is None else ~hidden)
    x = x + _linear(context.transpose(1, 2).reshape(b, n, emb), block.out_proj)
    return _feed_forward(x, block, eps)


def forward_cached(weights: InferenceWeights, in_idx: torch.Tensor, cache: KVCache, *,
                   last_only: bool = False) -> torch.Tensor:
    """Logits for the new tokens `in_idx` (batch, n), which continue the `cache.length`
    tokens the cache holds; their keys and values are added to it.

    With `last_only`, only the last position's logits (batch, vocab): reading a prompt
    needs no more, and the output head is the largest matrix of the model.
    """
    start, n = cache.length, in_idx.shape[1]
    if start + n > cache.capacity:
        raise ValueError(f"The cache holds {start} of {cache.capacity} positions; {n} more do not fit. "
                         "Start a new cache (generate_stream slides the window for you).")
    x = weights.tok_emb[in_idx] + weights.pos_emb[start:start + n]
    for layer, block in enumerate(weights.blocks):
        x = _block_tokens(x, block, cache.keys[layer], cache.values[layer], start, weights.n_heads, weights.eps)
    cache.length = start + n
    if last_only:
        x = x[:, -1, :]
    return _linear(_layer_norm(x, weights.final_norm, weights.eps), weights.head)


#####################################
# One new token per row: the decoding step
#####################################

def _scores(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """q (rows, heads, hd) . keys (rows, heads, span, hd) -> (rows, heads, span)."""
    if torch.compiler.is_compiling():  # a plain loop, which compiles into a fused kernel
        return (q.unsqueeze(2) * keys).sum(-1)
    return (q.unsqueeze(2) @ keys.transpose(-1, -2)).squeeze(2)


def _weighted_sum(probs: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """probs (rows, heads, span) . values (rows, heads, span, hd) -> (rows, heads, hd)."""
    if torch.compiler.is_compiling():
        return (probs.unsqueeze(-1) * values).sum(-2)
    return (probs.unsqueeze(2) @ values).squeeze(2)


def _attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                hidden: torch.Tensor | None) -> torch.Tensor:
    """Attention of one new token per row (q, k, v: (rows, heads, hd)) over the cached
    positions (`keys`/`values`: (rows, heads, span, hd)) and itself.

    The new token's own key and value are taken as they are: the step only reads the
    cache, and its caller writes k and v into it afterwards (a compiled function that
    also wrote into the cache would copy the whole cache at every step to do so).
    `hidden` (rows, span) marks cached positions a row may not see.
    """
    scores = torch.cat([_scores(q, keys), (q * k).sum(-1, keepdim=True)], dim=-1)
    if hidden is not None:
        scores[:, :, :-1] = scores[:, :, :-1].masked_fill(hidden[:, None, :], -torch.inf)
    probs = torch.softmax(scores / math.sqrt(q.shape[-1]), dim=-1)
    return _weighted_sum(probs[:, :, :-1], values) + probs[:, :, -1:] * v


def _decode_block(x: torch.Tensor, block: BlockWeights, keys: torch.Tensor, values: torch.Tensor,
                  positions: torch.Tensor, span: int, n_heads: int,
                  eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    """One block for one new token per row (x: (rows, emb)); row r sits at `positions[r]`.

    The row attends to its cached positions 0..positions[r]-1 (all below `span`) and to
    the new token. Returns the new x, the new token's key and value (for the caller to
    store at positions[r]), and the vectors the block's matrix products read: a compiled
    step stores a returned vector once, where it would otherwise recompute a layer norm
    or GELU inside the product's loop, once for every row of the weight matrix.
    """
    rows, emb = x.shape
    head_dim = emb // n_heads
    h1 = _layer_norm(x, block.norm1, eps)
    q, k, v = (_linear(h1, lin).view(rows, n_heads, head_dim) for lin in (block.query, block.key, block.value))
    hidden = None if rows == 1 else torch.arange(span, device=x.device) >= positions[:, None]
    context = _attend_one(q, k, v, keys[:, :, :span], values[:, :, :span], hidden).reshape(rows, emb)
    x = x + _linear(context, block.out_proj)
    h2 = _layer_norm(x, block.norm2, eps)
    hidden_units = F.gelu(_linear(h2, block.expand), approximate="tanh")  # the chapter's GELU formula
    return x + _linear(hidden_units, block.project), k, v, (h1, context, h2, hidden_units)


def _decode_head(x: torch.Tensor, final_norm: tuple[torch.Tensor, torch.Tensor], head: LinearWeights,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the last layer's output x; also returns the normalized x (see `_decode_block`)."""
    normalized = _layer_norm(x, final_norm, eps)
    return _linear(normalized, head), normalized


class _StepFunctions:
    """The decoding step's two functions, compiled on first use where that works.

    torch.compile needs a C++ compiler on the CPU (Triton on a GPU). Where compiling
    fails, a one-line note says so and the same functions run as plain PyTorch.
    """

    def __init__(self):
        self.compiled = None
        self.failed = False

    def get(self, use_compile: bool):
        if not use_compile or self.failed:
            return _decode_block, _decode_head
        if self.compiled is None:
            # The first call compiles for its cache length; the second, with a longer
            # cache, compiles once more with the length as a variable.
            self.compiled = (torch.compile(_decode_block), torch.compile(_decode_head, dynamic=False))
        return self.compiled

    def fall_back(self, err: Exception) -> None:
        self.failed = True
        print(f"note: torch.compile is not available here ({type(err).__name__}: {str(err).splitlines()[0][:150]}); "
              f"decoding runs as plain PyTorch, slower. Set {COMPILE_ENV}=0 to skip the attempt.", file=sys.stderr)


_STEP = _StepFunctions()


def compile_enabled() -> bool:
    """Whether decoding steps are compiled: yes, unless CH05_COMPILE=0 (or compiling failed)."""
    return os.environ.get(COMPILE_ENV, "1") != "0" and not _STEP.failed


def _run_step(token_ids: torch.Tensor, positions: torch.Tensor, weights: InferenceWeights, cache: KVCache,
              use_compile: bool) -> torch.Tensor:
    span = int(positions.max())  # cached positions any row attends to
    block_fn, head_fn = _STEP.get(use_compile)
    x = weights.tok_emb[token_ids] + weights.pos_emb[positions]
    rows = torch.arange(len(positions), device=positions.device)
    for layer, block in enumerate(weights.blocks):
        keys, values = cache.keys[layer], cache.values[layer]
        x, k, v, _ = block_fn(x, block, keys, values, positions, span, weights.n_heads, weights.eps)
        keys[rows, :, positions], values[rows, :, positions] = k, v
    return head_fn(x, weights.final_norm, weights.head, weights.eps)[0]


def decode_rows(weights: InferenceWeights, token_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache, *,
                use_compile: bool | None = None) -> torch.Tensor:
    """Logits (rows, vocab) for one new token per cache row: `token_ids[r]` at `positions[r]`.

    Each row has its own length, so rows of different generations can advance together:
    one pass over the weights serves them all. Row r must already hold its first
    `positions[r]` positions. A single row is compiled by default (see `compile_enabled`);
    several rows use matrix products (BLAS, or oneDNN with packed weights), which read
    each weight once for all rows. The caller keeps track of each row's length
    (`cache.length` is not used).
    """
    rows = token_ids.shape[0]
    if cache.keys.shape[1] != rows or positions.shape != (rows,):
        raise ValueError(f"decode_rows needs one token and one position per cache row ({cache.keys.shape[1]}), "
                         f"got {tuple(token_ids.shape)} and {tuple(positions.shape)}")
    if int(positions.max()) >= cache.capacity:
        raise ValueError(f"A position is past the cache's capacity {cache.capacity}.")
    use_compile = (compile_enabled() and rows == 1) if use_compile is None else use_compile
    if use_compile:
        try:
            return _run_step(token_ids, positions, weights, cache, use_compile=True)
        except (torch._dynamo.exc.BackendCompilerFailed, OSError) as err:  # no C++ compiler, ...
            _STEP.fall_back(err)
    return _run_step(token_ids, positions, weights, cache, use_compile=False)


#####################################
# Threads for decoding
#####################################

def decode_threads() -> int:
    """Threads for decoding one sequence: CH05_DECODE_THREADS if set, else half of
    PyTorch's default (one on a machine with two cores or fewer).

    A one-token step reads memory as fast as it can and computes little: a few cores
    keep the memory bus busy, and every extra thread adds a hand-off at each of the
    step's loops. On the 2-core machine this folder was developed on, one thread reads
    nearly as fast as two (`ui_generation_benchmark.py --threads` measures it).
    """
    value = os.environ.get(DECODE_THREADS_ENV, "")
    if value:
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"{DECODE_THREADS_ENV} must be a whole number >= 1, got {value!r}")
        return int(value)
    return max(1, torch.get_num_threads() // 2)


#####################################
# Sampling and generation
#####################################

def sample_next_token(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                      top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token id for each row of `logits` (batch, vocab); returns (batch, 1).

    temperature 0 is greedy decoding. Otherwise the logits are filtered by `top_k` (keep
    the k most likely tokens) and `top_p` (keep the smallest set of most likely tokens
    whose probabilities add up to at least p, "nucleus sampling"), then sampled from
    softmax(logits / temperature). Without top_p this computes exactly what the
    chapter's `generate` computes, so it draws the same tokens from the same generator.
    """
    if top_k is not None:
        kth_largest = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = torch.where(logits < kth_largest, -torch.inf, logits)
    if temperature == 0.0:
        return torch.argmax(logits, dim=-1, keepdim=True)
    logits = logits / temperature
    probs = torch.softmax(logits - logits.max(dim=-1, keepdim=True).values, dim=-1)
    if top_p is not None and top_p < 1.0:
        # Drop a token when the more likely tokens before it already reach top_p (the
        # most likely token always stays). Sorting only the tokens still possible is
        # much faster after top-k.
        sorted_probs, order = torch.topk(probs, int((probs > 0).sum(dim=-1).max()))
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return torch.multinomial(probs, num_samples=1, generator=generator)


class _Threads:
    """Use `n` torch threads inside a `with` block, then restore the previous number."""

    def __init__(self, n: int):
        self.n, self.before = n, torch.get_num_threads()

    def __enter__(self):
        if self.n != self.before:
            torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        if self.n != self.before:
            torch.set_num_threads(self.before)


def generate_stream(model: GPTModel, token_ids: list[int], max_new_tokens: int, temperature: float = 0.0,
                    top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
                    generator: torch.Generator | None = None, *, int8: bool = False,
                    threads: int | None = None, use_compile: bool | None = None) -> Iterator[int]:
    """Yield up to `max_new_tokens` new token ids continuing `token_ids`, one at a time.

    The prompt is read in one forward pass that fills the cache; after that every token
    costs one step over one position. Like the chapter's `generate`, the model only ever
    sees the last `context_length` tokens: when the cache is full, the window slides by
    rebuilding the cache from the last `context_length` tokens (one full pass per token
    from then on, which is why the apps leave room for the reply in the window).
    Like the book's `generate`, it stops when the next token is `eos_id`, without
    yielding it. `int8=True` decodes with int8 weights (see `inference_weights`);
    `threads` defaults to `decode_threads()`, `use_compile` to `compile_enabled()`.
    """
    if not token_ids:
        raise ValueError("The prompt is empty: pass at least one token id.")
    if model.training:
        raise RuntimeError("The KV-cache forward pass is for inference: call model.eval() first (it skips dropout).")
    weights = inference_weights(model, int8=int8)
    threads = decode_threads() if threads is None else threads
    use_compile = compile_enabled() if use_compile is None else use_compile
    yield from _generate(model, weights, list(token_ids), max_new_tokens, (temperature, top_k, top_p), eos_id,
                         generator, threads, use_compile)


@torch.inference_mode()
def _generate(model: GPTModel, weights: InferenceWeights, tokens: list[int], max_new_tokens: int,
              sampling: tuple, eos_id: int | None, generator: torch.Generator | None, threads: int,
              use_compile: bool) -> Iterator[int]:
    device, ctx = weights.tok_emb.device, weights.pos_emb.shape[0]
    cache = new_cache(model, capacity=min(ctx, len(tokens) + max_new_tokens))
    with _Threads(threads):
        logits = forward_cached(weights, torch.tensor([tokens[-ctx:]], device=device), cache, last_only=True)
    for step in range(max_new_tokens):
        with _Threads(threads):
            next_id = sample_next_token(logits, *sampling, generator=generator).item()
        if next_id == eos_id:
            return
        yield next_id
        if step == max_new_tokens - 1:
            return
        tokens.append(next_id)
        with _Threads(threads):
            if cache.length == cache.capacity:  # window full: slide it by one token
                cache.reset()
                logits = forward_cached(weights, torch.tensor([tokens[-ctx:]], device=device), cache, last_only=True)
            else:
                position = torch.tensor([cache.length], device=device)
                logits = decode_rows(weights, torch.tensor([next_id], device=device), position, cache,
                                     use_compile=use_compile)
                cache.length += 1


def generate_kv(model: GPTModel, idx: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
                generator: torch.Generator | None = None, *, int8: bool = False,
                threads: int | None = None, use_compile: bool | None = None) -> torch.Tensor:
    """`generate_stream` collected into a (1, n_tokens) tensor, like the chapter's `generate`."""
    if idx.shape[0] != 1:
        raise ValueError(f"generate_kv decodes one sequence at a time, got a batch of {idx.shape[0]}")
    new = list(generate_stream(model, idx[0].tolist(), max_new_tokens, temperature, top_k, top_p, eos_id, generator,
                               int8=int8, threads=threads, use_compile=use_compile))
    return torch.cat([idx, torch.tensor([new], dtype=idx.dtype, device=idx.device)], dim=1)


#####################################
# The model
#####################################

class GPTModelKV(GPTModel):
    """The chapter's GPTModel plus a forward pass that reads and extends a KV cache."""

    @property
    def context_length(self) -> int:
        return self.pos_emb.num_embeddings

    def new_cache(self, batch_size: int = 1, capacity: int | None = None) -> KVCache:
        """An empty cache for up to `capacity` positions (default: the context length)."""
        return new_cache(self, batch_size, capacity)

    def forward(self, in_idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Logits for every position of `in_idx`.

        Without `cache`: the chapter's forward pass over the whole sequence. With one:
        `in_idx` holds only the NEW tokens, which continue the `cache.length` tokens the
        cache already holds; their keys and values are added to it.
        """
        if cache is None:
            return super().forward(in_idx)
        self._check_eval()
        return forward_cached(inference_weights(self), in_idx, cache)

    def next_token_logits(self, in_idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Like `forward(in_idx, cache)`, but only the last position's logits (batch, vocab)."""
        self._check_eval()
        return forward_cached(inference_weights(self), in_idx, cache, last_only=True)

    def _check_eval(self) -> None:
        if self.training:
            raise RuntimeError("The KV-cache forward pass is for inference: call model.eval() first "
                               "(it skips dropout).")
