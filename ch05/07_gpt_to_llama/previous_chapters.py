"""The code of chapters 2-5 that chapter 5 and the later chapters import.

Chapter 2: tokenizing text with GPT-2's byte-pair encoding and cutting it into
training windows. Chapter 3: causal multi-head self-attention. Chapter 4: the GPT
model and greedy decoding. Chapter 5: the loss, the training loop, temperature and
top-k decoding, and loading OpenAI's GPT-2 weights -- the names chapters 6 and 7
import from their `previous_chapters.py`.

Shared file. The canonical copy is ch05/01_main-chapter-code/previous_chapters.py;
`make sync` (scripts/sync_shared_code.py) overwrites the copies in the other ch05
folders with it, so edit the canonical file, never a copy.
"""

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import tiktoken
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

GPT_CONFIG_124M = {
    "vocab_size": 50257,     # GPT-2's BPE vocabulary
    "context_length": 256,   # shortened from GPT-2's 1024 so training fits a laptop
    "emb_dim": 768,          # embedding dimension
    "n_heads": 12,           # attention heads per block
    "n_layers": 12,          # transformer blocks
    "drop_rate": 0.1,        # dropout rate
    "qkv_bias": False,       # bias in the query/key/value projections
}


#####################################
# Chapter 2: data
#####################################

def get_tokenizer() -> tiktoken.Encoding:
    """GPT-2's byte-pair-encoding tokenizer (50,257 tokens)."""
    return tiktoken.get_encoding("gpt2")


class GPTDatasetV1(Dataset):
    """Input/target windows cut from one long text.

    Each input is `max_length` token ids; its target is the same window shifted one
    token to the right, so position i learns to predict token i + 1. Consecutive
    windows start `stride` tokens apart (stride == max_length: no overlap).
    """

    def __init__(self, txt: str, tokenizer, max_length: int, stride: int):
        if max_length < 1 or stride < 1:
            raise ValueError(f"max_length and stride must be >= 1, got {max_length} and {stride}")
        token_ids = tokenizer.encode(txt, allowed_special={"<|endoftext|>"})
        self.input_ids = []
        self.target_ids = []
        for i in range(0, len(token_ids) - max_length, stride):
            self.input_ids.append(torch.tensor(token_ids[i:i + max_length]))
            self.target_ids.append(torch.tensor(token_ids[i + 1:i + max_length + 1]))

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, idx: int):
        return self.input_ids[idx], self.target_ids[idx]


def create_dataloader_v1(txt: str, batch_size: int = 4, max_length: int = 256,
                         stride: int = 128, shuffle: bool = True, drop_last: bool = True,
                         num_workers: int = 0, *, generator: torch.Generator | None = None) -> DataLoader:
    """A DataLoader over `GPTDatasetV1` windows of `txt`.

    Pass a seeded `generator` to make the shuffling order reproducible on its own,
    independent of other code that draws from torch's global random state.
    """
    dataset = GPTDatasetV1(txt, get_tokenizer(), max_length, stride)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                      num_workers=num_workers, generator=generator)


#####################################
# Chapter 3: attention
#####################################

class MultiHeadAttention(nn.Module):
    """Causal multi-head self-attention.

    One linear layer per query, key and value produces all heads at once; the
    projections are then split into `num_heads` heads of `d_out // num_heads` each.
    """

    def __init__(self, d_in: int, d_out: int, context_length: int, dropout: float,
                 num_heads: int, qkv_bias: bool = False):
        super().__init__()
        if d_out % num_heads != 0:
            raise ValueError(f"d_out ({d_out}) must be divisible by num_heads ({num_heads})")
        self.d_out = d_out
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)  # combines the heads' outputs
        self.dropout = nn.Dropout(dropout)
        # 1 above the diagonal: the future positions a token may not look at. A buffer
        # moves with the model between devices but is not trained. It is stored in the
        # state dict (as in the book), so state dicts interchange with the book's model
        # and every recipe that fills a model from a state dict also fills the mask.
        self.register_buffer("mask", torch.triu(torch.ones(context_length, context_length), diagonal=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, num_tokens, _ = x.shape
        # (b, num_tokens, d_out) -> (b, num_heads, num_tokens, head_dim)
        queries = self.W_query(x).view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        keys = self.W_key(x).view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        values = self.W_value(x).view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)

        attn_scores = queries @ keys.transpose(2, 3)
        attn_scores.masked_fill_(self.mask[:num_tokens, :num_tokens].bool(), -torch.inf)
        attn_weights = torch.softmax(attn_scores / self.head_dim**0.5, dim=-1)
        attn_weights = self.dropout(attn_weights)

        context = (attn_weights @ values).transpose(1, 2).reshape(b, num_tokens, self.d_out)
        return self.out_proj(context)


#####################################
# Chapter 4: the GPT model
#####################################

class LayerNorm(nn.Module):
    """Normalizes each token's features to mean 0 and variance 1, then rescales.

    `scale` and `shift` are learned, so the model can undo the normalization where
    that helps. `eps` keeps the division finite.
    """

    def __init__(self, emb_dim: int):
        super().__init__()
        self.eps = 1e-5
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True, unbiased=False)
        norm_x = (x - mean) / torch.sqrt(var + self.eps)
        return self.scale * norm_x + self.shift


class GELU(nn.Module):
    """GELU activation in the tanh approximation that GPT-2 was trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1 + torch.tanh(
            torch.sqrt(torch.tensor(2.0 / torch.pi)) * (x + 0.044715 * torch.pow(x, 3))
        ))


class FeedForward(nn.Module):
    """Position-wise MLP: widen 4x, GELU, project back."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(cfg["emb_dim"], 4 * cfg["emb_dim"]),
            GELU(),
            nn.Linear(4 * cfg["emb_dim"], cfg["emb_dim"]),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: x + attention(norm(x)), then x + MLP(norm(x))."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.att = MultiHeadAttention(
            d_in=cfg["emb_dim"],
            d_out=cfg["emb_dim"],
            context_length=cfg["context_length"],
            num_heads=cfg["n_heads"],
            dropout=cfg["drop_rate"],
            qkv_bias=cfg["qkv_bias"],
        )
        self.ff = FeedForward(cfg)
        self.norm1 = LayerNorm(cfg["emb_dim"])
        self.norm2 = LayerNorm(cfg["emb_dim"])
        self.drop_shortcut = nn.Dropout(cfg["drop_rate"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_shortcut(self.att(self.norm1(x)))
        x = x + self.drop_shortcut(self.ff(self.norm2(x)))
        return x


class GPTModel(nn.Module):
    """GPT-2: token + position embeddings, `n_layers` transformer blocks, a final
    LayerNorm and a linear head that maps each position to logits over the vocabulary.
    """

    def __init__(self, cfg: dict):
        super().__init__()
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"])
        self.pos_emb = nn.Embedding(cfg["context_length"], cfg["emb_dim"])
        self.drop_emb = nn.Dropout(cfg["drop_rate"])
        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg) for _ in range(cfg["n_layers"])])
        self.final_norm = LayerNorm(cfg["emb_dim"])
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False)

    def forward(self, in_idx: torch.Tensor) -> torch.Tensor:
        batch_size, seq_len = in_idx.shape
        context_length = self.pos_emb.num_embeddings
        if seq_len > context_length:
            raise ValueError(
                f"Input has {seq_len} tokens but the model's context length is {context_length}; "
                "pass at most context_length tokens (generate() keeps only the last ones)."
            )
        tok_embeds = self.tok_emb(in_idx)
        pos_embeds = self.pos_emb(torch.arange(seq_len, device=in_idx.device))
        x = self.drop_emb(tok_embeds + pos_embeds)
        x = self.trf_blocks(x)
        x = self.final_norm(x)
        return self.out_head(x)


def generate_text_simple(model: nn.Module, idx: torch.Tensor, max_new_tokens: int,
                         context_size: int) -> torch.Tensor:
    """Greedy decoding: append the most likely next token `max_new_tokens` times.

    `idx` is a (batch, n_tokens) tensor of token ids; only the last `context_size`
    tokens are fed to the model, since it supports no more.
    """
    for _ in range(max_new_tokens):
        idx_cond = idx[:, -context_size:]
        with torch.no_grad():
            logits = model(idx_cond)
        next_idx = torch.argmax(logits[:, -1, :], dim=-1, keepdim=True)
        idx = torch.cat((idx, next_idx), dim=1)
    return idx


#####################################
# Chapter 5.1: text <-> token ids, and the loss
#####################################

def text_to_token_ids(text: str, tokenizer) -> torch.Tensor:
    """Encode `text` into a (1, n_tokens) tensor: a batch of one.

    GPT-2's tokenizer is told that `<|endoftext|>` in the text is the special token;
    other tokenizers (the Llama ones of 07_gpt_to_llama) take only the text.
    """
    if isinstance(tokenizer, tiktoken.Encoding):
        encoded = tokenizer.encode(text, allowed_special={"<|endoftext|>"})
    else:
        encoded = tokenizer.encode(text)
    return torch.tensor(encoded).unsqueeze(0)


def token_ids_to_text(token_ids: torch.Tensor, tokenizer) -> str:
    """Decode a (1, n_tokens) or (n_tokens,) tensor of token ids back into text."""
    return tokenizer.decode(token_ids.squeeze(0).tolist())


def calc_loss_batch(input_batch: torch.Tensor, target_batch: torch.Tensor, model: nn.Module,
                    device: torch.device) -> torch.Tensor:
    """Mean cross-entropy of the model's next-token predictions on one batch."""
    input_batch, target_batch = input_batch.to(device), target_batch.to(device)
    logits = model(input_batch)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), target_batch.flatten())


def calc_loss_loader(data_loader: DataLoader, model: nn.Module, device: torch.device,
                     num_batches: int | None = None) -> float:
    """Average `calc_loss_batch` over the first `num_batches` batches (all by default)."""
    if len(data_loader) == 0:
        return float("nan")
    num_batches = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    total_loss = 0.0
    for i, (input_batch, target_batch) in enumerate(data_loader):
        if i >= num_batches:
            break
        total_loss += calc_loss_batch(input_batch, target_batch, model, device).item()
    return total_loss / num_batches


def evaluate_model(model: nn.Module, train_loader: DataLoader, val_loader: DataLoader,
                   device: torch.device, eval_iter: int) -> tuple[float, float]:
    """Training and validation loss over `eval_iter` batches each, in eval mode (no dropout)."""
    model.eval()
    with torch.no_grad():
        train_loss = calc_loss_loader(train_loader, model, device, num_batches=eval_iter)
        val_loss = calc_loss_loader(val_loader, model, device, num_batches=eval_iter)
    model.train()
    return train_loss, val_loss


#####################################
# Chapter 5.2: the training loop
#####################################

@dataclass
class TrainProgress:
    """Where a training run stands: enough to resume it exactly.

    `batches_done` counts the batches of the current epoch already trained on; the
    two loader RNG states are the training loader's shuffle generator at the start of
    this epoch (to recreate its batch order) and now (for what comes next).
    """
    epoch: int = 0
    batches_done: int = 0
    global_step: int = -1
    tokens_seen: int = 0
    train_losses: list = field(default_factory=list)
    val_losses: list = field(default_factory=list)
    track_tokens_seen: list = field(default_factory=list)
    loader_rng_epoch_start: torch.Tensor | None = None
    loader_rng_now: torch.Tensor | None = None
    last_loss: float | None = None  # the latest batch's loss, to notice a diverging run

    def to_dict(self) -> dict:
        return asdict(self)


def _epoch_batches(train_loader: DataLoader, progress: TrainProgress):
    """An iterator over this epoch's batches, positioned where `progress` says.

    A fresh run simply iterates the loader. A run resumed mid-epoch restores the
    shuffle generator's state from the start of the epoch, skips the batches already
    trained on, and then restores the generator's latest state, so the batch order
    (and every later epoch's) is exactly that of an uninterrupted run.
    """
    generator = getattr(train_loader, "generator", None)
    if generator is not None:
        if progress.batches_done == 0:
            if progress.loader_rng_now is not None:  # a no-op unless resuming at an epoch boundary
                generator.set_state(progress.loader_rng_now)
            progress.loader_rng_epoch_start = generator.get_state()
        else:  # resuming mid-epoch: replay this epoch's shuffle order
            generator.set_state(progress.loader_rng_epoch_start)
    batches = iter(train_loader)
    for _ in range(progress.batches_done):
        next(batches)
    if generator is not None and progress.loader_rng_now is not None and progress.batches_done:
        generator.set_state(progress.loader_rng_now)
    return batches


def train_model_simple(model: nn.Module, train_loader: DataLoader, val_loader: DataLoader,
                       optimizer: torch.optim.Optimizer, device: torch.device, num_epochs: int,
                       eval_freq: int, eval_iter: int, start_context: str, tokenizer, *,
                       progress: TrainProgress | None = None, max_steps: int | None = None,
                       on_step=None, print_fn=print, progress_bar: bool = False):
    """The chapter's training loop: one optimizer step per batch, evaluation every
    `eval_freq` steps, a greedy sample after each epoch.

    Returns (train_losses, val_losses, track_tokens_seen), as in the book. The
    keyword-only arguments make the loop resumable without changing what it computes:
    `progress` says where to start (it is updated in place), `on_step(progress)` is
    called after every step (gpt_train.py saves checkpoints there), and `max_steps`
    stops early.
    """
    progress = progress or TrainProgress()
    generator = getattr(train_loader, "generator", None)
    while progress.epoch < num_epochs:
        model.train()
        loader_iter = batches = _epoch_batches(train_loader, progress)
        if progress_bar:
            from tqdm.auto import tqdm
            batches = tqdm(batches, total=len(train_loader), initial=progress.batches_done,
                           desc=f"Epoch {progress.epoch + 1}/{num_epochs}", leave=False)
        for input_batch, target_batch in batches:
            optimizer.zero_grad()
            loss = calc_loss_batch(input_batch, target_batch, model, device)
            loss.backward()
            optimizer.step()
            progress.last_loss = loss.item()
            progress.tokens_seen += input_batch.numel()
            progress.global_step += 1
            progress.batches_done += 1

            if progress.global_step % eval_freq == 0:
                train_loss, val_loss = evaluate_model(model, train_loader, val_loader, device, eval_iter)
                progress.train_losses.append(train_loss)
                progress.val_losses.append(val_loss)
                progress.track_tokens_seen.append(progress.tokens_seen)
                print_fn(f"Ep {progress.epoch + 1} (Step {progress.global_step:06d}): "
                         f"Train loss {train_loss:.3f}, Val loss {val_loss:.3f}")
            if progress.batches_done == len(train_loader):  # epoch done: move on before saving
                # Finish the iterator as a plain `for` loop would: its last call draws from
                # the shuffling generator, and the next epoch's order depends on that.
                next(loader_iter, None)
                generate_and_print_sample(model, tokenizer, device, start_context, print_fn=print_fn)
                progress.epoch += 1
                progress.batches_done = 0
            if generator is not None:
                progress.loader_rng_now = generator.get_state()
            if on_step is not None:
                on_step(progress)
            if max_steps is not None and progress.global_step + 1 >= max_steps:
                return progress.train_losses, progress.val_losses, progress.track_tokens_seen
            if progress.batches_done == 0:
                break  # the epoch is over
    return progress.train_losses, progress.val_losses, progress.track_tokens_seen


def plot_losses(epochs_seen, tokens_seen, train_losses, val_losses, *, path=None):
    """Training and validation loss against epochs (bottom axis) and tokens seen (top
    axis). Returns the figure; with `path`, also saves it there (e.g. a PNG)."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax1 = plt.subplots(figsize=(5, 3))
    ax1.plot(epochs_seen, train_losses, label="Training loss")
    ax1.plot(epochs_seen, val_losses, linestyle="-.", label="Validation loss")
    ax1.set_xlabel("Epochs")
    ax1.set_ylabel("Loss")
    ax1.legend(loc="upper right")
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax2 = ax1.twiny()  # same y-axis, second x-axis for tokens seen
    ax2.plot(tokens_seen, train_losses, alpha=0)  # invisible: only aligns the ticks
    ax2.set_xlabel("Tokens seen")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


#####################################
# Chapter 5.3: decoding with temperature and top-k
#####################################

def generate(model: nn.Module, idx: torch.Tensor, max_new_tokens: int, context_size: int,
             temperature: float = 0.0, top_k: int | None = None, eos_id: int | None = None, *,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Extend each row of `idx` (batch, n_tokens) by up to `max_new_tokens` tokens.

    temperature == 0 picks the most likely token (greedy); temperature > 0 samples from
    softmax(logits / temperature), sharper below 1 and flatter above. `top_k` keeps only
    the k most likely tokens before sampling. When the next token is `eos_id`,
    generation stops and that token is not appended, as in the book. (With several
    rows, a row that has finished is padded with `eos_id` until every row has.) Pass a
    seeded `generator` to make the sampling reproducible on its own.
    """
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    finished = None
    for _ in range(max_new_tokens):
        with torch.no_grad():
            logits = model(idx[:, -context_size:])[:, -1, :]
        if top_k is not None:
            top_logits, _ = torch.topk(logits, min(top_k, logits.shape[-1]))
            logits = torch.where(logits < top_logits[:, -1:], -torch.inf, logits)
        if temperature > 0.0:
            logits = logits / temperature
            logits = logits - logits.max(dim=-1, keepdim=True).values  # no overflow in exp()
            probs = torch.softmax(logits, dim=-1)
            idx_next = torch.multinomial(probs, num_samples=1, generator=generator)
        else:
            idx_next = torch.argmax(logits, dim=-1, keepdim=True)
        if eos_id is not None:
            if finished is not None:
                idx_next = idx_next.masked_fill(finished, eos_id)
            finished = idx_next == eos_id
            if finished.all():
                break
        idx = torch.cat((idx, idx_next), dim=1)
    return idx


def generate_and_print_sample(model: GPTModel, tokenizer, device: torch.device, start_context: str, *,
                              max_new_tokens: int = 50, print_fn=print) -> str:
    """Greedily continue `start_context` and print the text on one line (used during training)."""
    model.eval()
    context_size = model.pos_emb.weight.shape[0]
    encoded = text_to_token_ids(start_context, tokenizer).to(device)
    token_ids = generate_text_simple(model, encoded, max_new_tokens=max_new_tokens, context_size=context_size)
    text = token_ids_to_text(token_ids, tokenizer)
    print_fn(text.replace("\n", " "))
    model.train()
    return text


#####################################
# Chapter 5.5: OpenAI's GPT-2 weights
#####################################

def assign(left: torch.Tensor, right) -> torch.nn.Parameter:
    """A new Parameter holding a copy of `right` (a NumPy array or tensor), after
    checking that it has the shape of the tensor `left` it replaces."""
    if left is None:
        raise ValueError("The model has no tensor here (a bias?): GPT-2's checkpoints have query/key/value "
                         "biases, so build the model with qkv_bias=True.")
    if tuple(left.shape) != tuple(right.shape):
        raise ValueError(f"Shape mismatch. Left: {tuple(left.shape)}, Right: {tuple(right.shape)}. "
                         "Build the model with the checkpoint's sizes (config_from_hparams(settings)).")
    return torch.nn.Parameter(torch.as_tensor(right).detach().clone(memory_format=torch.contiguous_format))


def load_weights_into_gpt(gpt: GPTModel, params: dict) -> None:
    """Put OpenAI's GPT-2 weights (`params` from `download_and_load_gpt2`) into `gpt`.

    OpenAI's layers store weights as (in, out) and PyTorch's nn.Linear as (out, in), so
    the weights are transposed; GPT-2 keeps query, key and value in one matrix `c_attn`,
    which is split in three. GPT-2 reuses the token embedding as its output layer; as
    in the book, the output head gets its own copy of it, so the two can be fine-tuned
    separately later on.
    """
    if len(params["blocks"]) != len(gpt.trf_blocks):
        raise ValueError(f"The checkpoint has {len(params['blocks'])} transformer blocks, the model "
                         f"{len(gpt.trf_blocks)}. Build the model with config_from_hparams(settings).")
    gpt.pos_emb.weight = assign(gpt.pos_emb.weight, params["wpe"])
    gpt.tok_emb.weight = assign(gpt.tok_emb.weight, params["wte"])
    for b, (block, p) in enumerate(zip(gpt.trf_blocks, params["blocks"], strict=True)):
        try:
            load_block_weights(block, p)
        except ValueError as err:
            raise ValueError(f"Transformer block {b} (OpenAI's h{b}): {err}") from None
    gpt.final_norm.scale = assign(gpt.final_norm.scale, params["g"])
    gpt.final_norm.shift = assign(gpt.final_norm.shift, params["b"])
    gpt.out_head.weight = assign(gpt.out_head.weight, params["wte"])


def load_block_weights(block: TransformerBlock, p: dict) -> None:
    """One transformer block's part of `load_weights_into_gpt`."""
    att, c_attn = block.att, p["attn"]["c_attn"]
    q_w, k_w, v_w = np.split(c_attn["w"], 3, axis=-1)
    q_b, k_b, v_b = np.split(c_attn["b"], 3, axis=-1)
    att.W_query.weight, att.W_query.bias = assign(att.W_query.weight, q_w.T), assign(att.W_query.bias, q_b)
    att.W_key.weight, att.W_key.bias = assign(att.W_key.weight, k_w.T), assign(att.W_key.bias, k_b)
    att.W_value.weight, att.W_value.bias = assign(att.W_value.weight, v_w.T), assign(att.W_value.bias, v_b)
    att.out_proj.weight = assign(att.out_proj.weight, p["attn"]["c_proj"]["w"].T)
    att.out_proj.bias = assign(att.out_proj.bias, p["attn"]["c_proj"]["b"])
    fc, proj = block.ff.layers[0], block.ff.layers[2]
    fc.weight, fc.bias = assign(fc.weight, p["mlp"]["c_fc"]["w"].T), assign(fc.bias, p["mlp"]["c_fc"]["b"])
    proj.weight = assign(proj.weight, p["mlp"]["c_proj"]["w"].T)
    proj.bias = assign(proj.bias, p["mlp"]["c_proj"]["b"])
    for norm, ln in ((block.norm1, p["ln_1"]), (block.norm2, p["ln_2"])):
        norm.scale, norm.shift = assign(norm.scale, ln["g"]), assign(norm.shift, ln["b"])


if __name__ == "__main__":
    # Run as a script: an untrained 124M-shaped GPT continues a prompt (with random words).
    torch.manual_seed(123)
    demo_model = GPTModel(GPT_CONFIG_124M).eval()
    demo_tokenizer = get_tokenizer()
    out = generate_text_simple(demo_model, text_to_token_ids("Hello, I am", demo_tokenizer),
                               max_new_tokens=10, context_size=GPT_CONFIG_124M["context_length"])
    print("Output text:", token_ids_to_text(out, demo_tokenizer))
