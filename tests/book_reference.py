"""The book's GPT model and chapter-5 functions, written here the way the book writes them.

Tests of several folders compare our code with these: state dicts must load both ways
under strict loading with identical logits, and our `generate` and
`load_weights_into_gpt` must give what the book's do. (Our own implementation, written
for the tests; the book's code itself is not copied here.)
"""

import numpy as np
import torch
import torch.nn as nn


class BookMultiHeadAttention(nn.Module):
    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__()
        self.d_out, self.num_heads, self.head_dim = d_out, num_heads, d_out // num_heads
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("mask", torch.triu(torch.ones(context_length, context_length), diagonal=1))

    def forward(self, x):
        b, n, _ = x.shape

        def heads(t):
            return t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.W_query(x)), heads(self.W_key(x)), heads(self.W_value(x))
        scores = q @ k.transpose(2, 3)
        scores.masked_fill_(self.mask.bool()[:n, :n], -torch.inf)
        weights = self.dropout(torch.softmax(scores / k.shape[-1] ** 0.5, dim=-1))
        return self.out_proj((weights @ v).transpose(1, 2).reshape(b, n, self.d_out))


class BookLayerNorm(nn.Module):
    def __init__(self, emb_dim):
        super().__init__()
        self.eps = 1e-5
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x):
        norm_x = (x - x.mean(dim=-1, keepdim=True)) / torch.sqrt(x.var(dim=-1, keepdim=True, unbiased=False)
                                                                  + self.eps)
        return self.scale * norm_x + self.shift


class BookGELU(nn.Module):
    def forward(self, x):
        return 0.5 * x * (1 + torch.tanh(torch.sqrt(torch.tensor(2.0 / torch.pi)) * (x + 0.044715 * x**3)))


class BookFeedForward(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(cfg["emb_dim"], 4 * cfg["emb_dim"]), BookGELU(),
                                    nn.Linear(4 * cfg["emb_dim"], cfg["emb_dim"]))

    def forward(self, x):
        return self.layers(x)


class BookTransformerBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.att = BookMultiHeadAttention(cfg["emb_dim"], cfg["emb_dim"], cfg["context_length"], cfg["drop_rate"],
                                          cfg["n_heads"], cfg["qkv_bias"])
        self.ff = BookFeedForward(cfg)
        self.norm1, self.norm2 = BookLayerNorm(cfg["emb_dim"]), BookLayerNorm(cfg["emb_dim"])
        self.drop_shortcut = nn.Dropout(cfg["drop_rate"])

    def forward(self, x):
        x = x + self.drop_shortcut(self.att(self.norm1(x)))
        return x + self.drop_shortcut(self.ff(self.norm2(x)))


class BookGPTModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"])
        self.pos_emb = nn.Embedding(cfg["context_length"], cfg["emb_dim"])
        self.drop_emb = nn.Dropout(cfg["drop_rate"])
        self.trf_blocks = nn.Sequential(*[BookTransformerBlock(cfg) for _ in range(cfg["n_layers"])])
        self.final_norm = BookLayerNorm(cfg["emb_dim"])
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False)

    def forward(self, in_idx):
        x = self.tok_emb(in_idx) + self.pos_emb(torch.arange(in_idx.shape[1], device=in_idx.device))
        x = self.final_norm(self.trf_blocks(self.drop_emb(x)))
        return self.out_head(x)


def book_generate(model, idx, max_new_tokens, context_size, temperature=0.0, top_k=None, eos_id=None):
    """The book's generate loop (batch of one), for comparison."""
    for _ in range(max_new_tokens):
        with torch.no_grad():
            logits = model(idx[:, -context_size:])[:, -1, :]
        if top_k is not None:
            top_logits, _ = torch.topk(logits, top_k)
            logits = torch.where(logits < top_logits[:, -1], torch.tensor(float("-inf")), logits)
        if temperature > 0.0:
            logits = logits / temperature
            logits = logits - logits.max(dim=-1, keepdim=True).values
            idx_next = torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1)
        else:
            idx_next = torch.argmax(logits, dim=-1, keepdim=True)
        if idx_next == eos_id:
            break
        idx = torch.cat((idx, idx_next), dim=1)
    return idx


def book_load_weights_into_gpt(gpt, params):
    """The book's loading function, in its long form, for comparison."""
    def put(module, attr, array):
        setattr(module, attr, torch.nn.Parameter(torch.tensor(array)))

    put(gpt.pos_emb, "weight", params["wpe"])
    put(gpt.tok_emb, "weight", params["wte"])
    for b, block in enumerate(gpt.trf_blocks):
        p = params["blocks"][b]
        q_w, k_w, v_w = np.split(p["attn"]["c_attn"]["w"], 3, axis=-1)
        q_b, k_b, v_b = np.split(p["attn"]["c_attn"]["b"], 3, axis=-1)
        for layer, w, bias in ((block.att.W_query, q_w, q_b), (block.att.W_key, k_w, k_b),
                               (block.att.W_value, v_w, v_b)):
            put(layer, "weight", w.T)
            put(layer, "bias", bias)
        for layer, key in ((block.att.out_proj, p["attn"]["c_proj"]), (block.ff.layers[0], p["mlp"]["c_fc"]),
                           (block.ff.layers[2], p["mlp"]["c_proj"])):
            put(layer, "weight", key["w"].T)
            put(layer, "bias", key["b"])
        put(block.norm1, "scale", p["ln_1"]["g"])
        put(block.norm1, "shift", p["ln_1"]["b"])
        put(block.norm2, "scale", p["ln_2"]["g"])
        put(block.norm2, "shift", p["ln_2"]["b"])
    put(gpt.final_norm, "scale", params["g"])
    put(gpt.final_norm, "shift", params["b"])
    put(gpt.out_head, "weight", params["wte"])
