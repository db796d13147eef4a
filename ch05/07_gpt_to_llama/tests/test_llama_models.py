"""Our Llama code computes what Hugging Face's reference implementation computes.

Every comparison builds the reference in `transformers` (tiny random configurations
with the features of each Llama version), copies the same weights into our code and
checks the outputs to float32 precision.
"""

import pytest
import torch
from llama3 import (
    LLAMA32_CONFIG_1B,
    GroupedQueryAttention,
    KVCache,
    Llama3Model,
    RMSNorm,
    apply_rope,
    compute_rope_params,
    config_from_hf,
    count_unique_parameters,
    generate,
    load_llama_checkpoint,
)
from previous_chapters import MultiHeadAttention
from tiny_llama_checkpoint import hf_llama_config
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb

VERSIONS = ["2", "3", "3.1", "3.2"]
VOCAB = 300


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread; two contend badly when the CPU is shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=VERSIONS)
def hf_checkpoint(request, tmp_path_factory):
    """(version, transformers model, folder it was saved to) for a tiny random Llama of each version."""
    torch.manual_seed(0)
    hf_model = LlamaForCausalLM(hf_llama_config(request.param, VOCAB)).eval()
    folder = tmp_path_factory.mktemp(f"llama{request.param}")
    hf_model.save_pretrained(folder, safe_serialization=True)
    return request.param, hf_model, folder


@pytest.mark.parametrize("attn_impl", ["sdpa", "manual"])
def test_logits_match_transformers(hf_checkpoint, attn_impl):
    version, hf_model, folder = hf_checkpoint
    model = load_llama_checkpoint(folder, dtype=torch.float32)
    for block in model.trf_blocks:
        block.att.attn_impl = attn_impl
    idx = torch.randint(0, VOCAB, (2, 96), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf_model(idx).logits
        actual = model(idx)
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)
    assert count_unique_parameters(model) == sum(p.numel() for p in hf_model.parameters())
    # The configs really differ the way the versions do.
    cfg = model.cfg
    assert (cfg["n_kv_groups"] == cfg["n_heads"]) == (version == "2")
    assert (cfg["rope_freq"] is not None) == (version in ("3.1", "3.2"))
    assert cfg["tie_embeddings"] == (version == "3.2")


def test_tied_embeddings_are_shared_not_copied(hf_checkpoint):
    version, hf_model, folder = hf_checkpoint
    model = load_llama_checkpoint(folder, dtype=torch.float32)
    tied = model.out_head.weight is model.tok_emb.weight
    assert tied == (version == "3.2")
    if tied:
        with torch.no_grad():
            model.tok_emb.weight[0, 0] += 1.0  # one storage: the head sees the change
        assert model.out_head.weight[0, 0] == model.tok_emb.weight[0, 0]


def test_fresh_model_ties_embeddings():
    cfg = {**LLAMA32_CONFIG_1B, "vocab_size": 50, "emb_dim": 32, "n_heads": 4, "n_kv_groups": 2,
           "n_layers": 1, "hidden_dim": 64, "context_length": 16, "dtype": torch.float32}
    model = Llama3Model(cfg)
    assert model.out_head.weight is model.tok_emb.weight
    untied = Llama3Model({**cfg, "tie_embeddings": False})
    assert count_unique_parameters(untied) - count_unique_parameters(model) == 50 * 32


@pytest.mark.parametrize("version,head_dim", [("2", 128), ("3", 128), ("3.1", 128), ("3.2", 64)])
def test_rope_matches_transformers(version, head_dim):
    """Real Llama RoPE settings (theta, 3.1/3.2 scaling with original context 8192) at positions up to 131k."""
    rope_scaling = None
    if version in ("3.1", "3.2"):
        rope_scaling = {"rope_type": "llama3", "factor": 8.0 if version == "3.1" else 32.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    hf_cfg = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, max_position_embeddings=131_072,
                         rope_theta=10_000.0 if version == "2" else 500_000.0, rope_scaling=rope_scaling)
    ours = config_from_hf(hf_cfg.to_dict())
    cos, sin = compute_rope_params(head_dim, ours["rope_base"], 131_072, ours["rope_freq"])
    positions = torch.arange(0, 131_072, 509)
    hf_cos, hf_sin = LlamaRotaryEmbedding(hf_cfg)(torch.zeros(1, dtype=torch.float32), positions[None])
    torch.testing.assert_close(cos[positions], hf_cos[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(sin[positions], hf_sin[0], rtol=0, atol=1e-6)
    if version in ("3.1", "3.2"):  # the scaling changes some frequencies, not all
        plain_cos, _ = compute_rope_params(head_dim, ours["rope_base"], 131_072)
        changed = (plain_cos[positions] - cos[positions]).abs().amax(dim=0) > 1e-3
        assert 0 < changed.sum() < head_dim

    x = torch.randn(2, 3, 10, head_dim)
    q_hf, _ = apply_rotary_pos_emb(x, x, cos[5:15][None], sin[5:15][None])
    torch.testing.assert_close(apply_rope(x, cos, sin, start_pos=5), q_hf)


def test_rope_keeps_norms_and_encodes_relative_position():
    cos, sin = compute_rope_params(16, 10_000.0, 64)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    rotate = lambda x, p: apply_rope(x, cos, sin, start_pos=p)
    torch.testing.assert_close(rotate(q, 7).norm(), q.norm())
    # q at position m and k at position n score the same as at m + s, n + s.
    score = lambda m, n: (rotate(q, m) * rotate(k, n)).sum()
    torch.testing.assert_close(score(9, 3), score(40, 34), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_transformers_and_torch(dtype):
    torch.manual_seed(0)
    x = (torch.randn(2, 5, 32) * 3).to(dtype)
    ours = RMSNorm(32, eps=1e-5, dtype=dtype)
    hf = LlamaRMSNorm(32, eps=1e-5).to(dtype)
    with torch.no_grad():
        ours.weight.copy_(torch.rand(32))
        hf.weight.copy_(ours.weight)
    torch.testing.assert_close(ours(x), hf(x), rtol=0, atol=0)
    if dtype == torch.float32:
        reference = torch.nn.RMSNorm(32, eps=1e-5)
        with torch.no_grad():
            reference.weight.copy_(ours.weight)
        torch.testing.assert_close(ours(x), reference(x))


def _identity_rope(context_length, head_dim):
    return torch.ones(context_length, head_dim), torch.zeros(context_length, head_dim)


def test_gqa_equals_chapter_mha_when_groups_equal_heads():
    """Without rotation and biases, GQA with one key/value head per query head is chapter 3's attention."""
    torch.manual_seed(0)
    d, heads, n = 48, 6, 11
    gqa = GroupedQueryAttention(d, d, heads, num_kv_groups=heads)
    mha = MultiHeadAttention(d, d, context_length=n, dropout=0.0, num_heads=heads)
    with torch.no_grad():
        for name in ("W_query", "W_key", "W_value", "out_proj"):
            getattr(mha, name).weight.copy_(getattr(gqa, name).weight)
        mha.out_proj.bias.zero_()
    x = torch.randn(3, n, d)
    cos, sin = _identity_rope(n, d // heads)
    torch.testing.assert_close(gqa(x, None, cos, sin), mha(x), rtol=0, atol=1e-5)


def test_gqa_equals_mha_with_repeated_key_value_heads():
    """2 key/value heads for 6 query heads == 6 key/value heads where heads 0-2 and 3-5 share weights."""
    torch.manual_seed(0)
    d, heads, groups, n = 48, 6, 2, 9
    head_dim = d // heads
    gqa = GroupedQueryAttention(d, d, heads, num_kv_groups=groups)
    mha = GroupedQueryAttention(d, d, heads, num_kv_groups=heads)
    with torch.no_grad():
        mha.W_query.weight.copy_(gqa.W_query.weight)
        mha.out_proj.weight.copy_(gqa.out_proj.weight)
        for name in ("W_key", "W_value"):
            per_head = getattr(gqa, name).weight.view(groups, head_dim, d)
            getattr(mha, name).weight.copy_(per_head.repeat_interleave(heads // groups, dim=0).reshape(d, d))
    cos, sin = compute_rope_params(head_dim, 10_000.0, n)
    x = torch.randn(2, n, d)
    torch.testing.assert_close(gqa(x, None, cos, sin), mha(x, None, cos, sin), rtol=0, atol=1e-5)
    assert gqa.W_key.weight.numel() * heads // groups == mha.W_key.weight.numel()


def _tiny_model(version="3.2", seed=0):
    torch.manual_seed(seed)
    hf_cfg = hf_llama_config(version, VOCAB)
    model = Llama3Model(config_from_hf(hf_cfg.to_dict(), dtype=torch.float32))
    with torch.no_grad():  # larger weights than the default init, so greedy decoding varies more
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model.eval()


@pytest.mark.parametrize("version", ["2", "3.2"])
def test_kv_cache_and_no_cache_give_the_same_greedy_text(version):
    model = _tiny_model(version)
    prompt = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))
    ctx = model.cfg["context_length"]
    cached = generate(model, prompt, 40, ctx, use_cache=True)
    uncached = generate(model, prompt, 40, ctx, use_cache=False)
    assert cached.shape == (2, 47)
    assert torch.equal(cached, uncached)
    assert len(set(cached[0, 7:].tolist())) > 3  # a real continuation, not one repeated token


def test_kv_cache_chunks_give_the_same_logits_as_one_pass():
    model = _tiny_model()
    idx = torch.randint(0, VOCAB, (2, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(idx)
        cache = KVCache(model.cfg, batch_size=2, max_len=30, dtype=torch.float32)
        parts = [model(idx[:, :12], kv_cache=cache), model(idx[:, 12:13], kv_cache=cache),
                 model(idx[:, 13:], kv_cache=cache)]
    assert cache.pos == 30
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-4)


def test_kv_cache_falls_back_to_the_sliding_window_past_the_context():
    """Past `context_size` the book's generate re-reads the last window; with the cache the tokens are the same."""
    model = _tiny_model()
    prompt = torch.randint(0, VOCAB, (1, 28), generator=torch.Generator().manual_seed(7))
    cached = generate(model, prompt, 12, 32, use_cache=True)
    uncached = generate(model, prompt, 12, 32, use_cache=False)
    assert cached.shape == (1, 40)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("use_cache", [False, True])
def test_generate_stops_before_eos_and_checks_arguments(use_cache):
    model = _tiny_model()
    ctx = model.cfg["context_length"]
    prompt = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(5))
    two = generate(model, prompt, 2, ctx, use_cache=use_cache)
    assert two.shape == (1, 7)
    # As in the book: when the next token is eos_id, generation stops and eos is not appended.
    assert torch.equal(generate(model, prompt, 20, ctx, eos_id=two[0, 5].item(), use_cache=use_cache), prompt)
    assert torch.equal(generate(model, prompt, 20, ctx, eos_id=two[0, 6].item(), use_cache=use_cache), two[:, :6])
    with pytest.raises(ValueError, match="temperature"):
        generate(model, prompt, 2, ctx, temperature=-1.0, use_cache=use_cache)
    with pytest.raises(ValueError, match="context length"):
        model(torch.zeros(1, ctx + 1, dtype=torch.long))
    sampled = [generate(model, prompt, 10, ctx, temperature=1.0, top_k=5, use_cache=use_cache,
                        generator=torch.Generator().manual_seed(s)) for s in (1, 1, 2)]
    assert torch.equal(sampled[0], sampled[1]) and not torch.equal(sampled[0], sampled[2])


def test_bfloat16_model_stays_close_to_float32():
    model = _tiny_model()
    idx = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = model(idx)
        low = model.to(torch.bfloat16)(idx)
    assert low.dtype == torch.bfloat16
    assert (low.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_bad_configs_are_explained():
    cfg = {**LLAMA32_CONFIG_1B, "n_kv_groups": 7}
    with pytest.raises(ValueError, match="divisible by n_kv_groups"):
        Llama3Model(cfg)
    with pytest.raises(ValueError, match="lacks"):
        Llama3Model({"vocab_size": 10})
