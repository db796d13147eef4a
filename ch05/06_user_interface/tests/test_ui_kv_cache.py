"""The KV-cache model gives the chapter's model's results, only faster."""

import pytest
import torch
from ch05_utils import generate
from gpt_kv_cache import GPTModelKV, generate_kv, generate_stream, sample_next_token
from previous_chapters import GPT_CONFIG_124M, GPTModel

CFG = {**GPT_CONFIG_124M, "context_length": 24, "emb_dim": 32, "n_heads": 4, "n_layers": 2, "drop_rate": 0.1}
# CPU always; a GPU too where there is one (CI has none; the README says where these ran on one).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module", params=DEVICES)
def models(request):
    """The chapter's model and a GPTModelKV loaded from its state dict, on each device."""
    torch.manual_seed(0)
    reference = GPTModel({**CFG, "qkv_bias": True}).eval()
    cached = GPTModelKV({**CFG, "qkv_bias": True})
    cached.load_state_dict(reference.state_dict())  # strict: same parameter names and shapes
    return reference.to(request.param), cached.to(request.param).eval()


def test_state_dicts_have_the_same_keys_and_shapes():
    plain, cached = GPTModel(CFG), GPTModelKV(CFG)
    assert {k: v.shape for k, v in plain.state_dict().items()} == {k: v.shape for k, v in cached.state_dict().items()}


def test_cached_forward_in_chunks_matches_the_full_forward_pass(models):
    reference, cached = models
    idx = torch.randint(0, CFG["vocab_size"], (2, 20), device=cached.tok_emb.weight.device)
    with torch.no_grad():
        expected = reference(idx)
        cache = cached.new_cache(batch_size=2)
        chunks = [cached(idx[:, a:b], cache) for a, b in ((0, 7), (7, 8), (8, 15), (15, 20))]
        assert cache.length == 20
        torch.testing.assert_close(torch.cat(chunks, dim=1), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cached(idx), expected)  # without a cache: the chapter's forward pass


@pytest.mark.parametrize("prompt_len,new_tokens", [(1, 10), (5, 19), (5, 40), (30, 6)])
def test_greedy_generation_is_identical_to_the_chapters_generate(models, prompt_len, new_tokens):
    """Including prompts + replies longer than the context (24), where the window slides."""
    reference, cached = models
    torch.manual_seed(prompt_len)
    idx = torch.randint(0, CFG["vocab_size"], (1, prompt_len)).to(cached.tok_emb.weight.device)
    expected = generate(reference, idx, new_tokens, CFG["context_length"])
    assert torch.equal(generate_kv(cached, idx, new_tokens), expected)


def test_sampling_draws_what_the_chapters_generate_draws_with_the_same_seed(models):
    reference, cached = models
    device = cached.tok_emb.weight.device
    idx = torch.randint(0, CFG["vocab_size"], (1, 4)).to(device)

    def seeded(seed):
        return torch.Generator(device=device).manual_seed(seed)

    expected = generate(reference, idx, 15, CFG["context_length"], temperature=1.3, top_k=20, generator=seeded(5))
    got = generate_kv(cached, idx, 15, temperature=1.3, top_k=20, generator=seeded(5))
    assert torch.equal(got, expected)
    other = generate_kv(cached, idx, 15, temperature=1.3, top_k=20, generator=seeded(6))
    assert not torch.equal(other, expected)  # the seed matters: the comparison above can fail


def test_generation_stops_after_the_end_token(models):
    _, cached = models
    idx = torch.randint(0, CFG["vocab_size"], (1, 3))
    free = list(generate_stream(cached, idx[0].tolist(), 12))
    stop_at = free[4]
    first = free.index(stop_at)
    assert list(generate_stream(cached, idx[0].tolist(), 12, eos_id=stop_at)) == free[:first + 1]


def test_top_p_keeps_the_smallest_set_of_tokens_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    generator = torch.Generator().manual_seed(0)

    def draws(top_p):
        samples = [sample_next_token(logits, 1.0, top_p=top_p, generator=generator) for _ in range(3000)]
        return torch.cat(samples).flatten()

    assert set(draws(0.5).tolist()) == {0}  # token 0 alone has 0.5
    nucleus = draws(0.7)  # tokens 0 and 1 (0.8), renormalized to 0.625 / 0.375
    assert set(nucleus.tolist()) == {0, 1}
    assert abs((nucleus == 0).float().mean().item() - 0.625) < 0.04
    assert set(draws(1.0).tolist()) == {0, 1, 2, 3}


def test_greedy_ignores_the_filters():
    logits = torch.tensor([[0.1, 3.0, 0.2]])
    assert sample_next_token(logits, 0.0, top_k=1, top_p=0.1).item() == 1


def test_the_cache_refuses_training_mode_and_overflow(models):
    _, cached = models
    cache = cached.new_cache(capacity=4)
    device = cached.tok_emb.weight.device
    cached.train()
    try:
        with pytest.raises(RuntimeError, match="eval"):
            cached(torch.zeros(1, 2, dtype=torch.long, device=device), cache)
    finally:
        cached.eval()
    with pytest.raises(ValueError, match="do not fit"):
        cached(torch.zeros(1, 5, dtype=torch.long, device=device), cache)
    with pytest.raises(ValueError, match="capacity"):
        cached.new_cache(capacity=CFG["context_length"] + 1)
    with pytest.raises(ValueError, match="empty"):
        list(generate_stream(cached, [], 3))


def test_same_logits_and_tokens_as_transformers_gpt2(models):
    """The benchmark's weight conversion is right: transformers computes the same model."""
    from ui_generation_benchmark import to_transformers

    _, cached = models
    hf_model = to_transformers(cached).to(cached.tok_emb.weight.device)
    idx = torch.randint(0, CFG["vocab_size"], (1, 10)).to(cached.tok_emb.weight.device)
    with torch.no_grad():
        torch.testing.assert_close(hf_model(idx).logits, cached(idx), rtol=1e-4, atol=1e-4)
        hf_tokens = hf_model.generate(idx, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                      attention_mask=torch.ones_like(idx), pad_token_id=0)
    assert torch.equal(hf_tokens, generate_kv(cached, idx, 12))


def test_benchmark_runs_at_tiny_scale(capsys):
    from ui_generation_benchmark import main

    assert main(["--model", "tiny", "--new-tokens", "8", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "GB/s" in out and out.count("tokens/s  (") == 3
    assert out.count(": all the same") == 2  # no cache and transformers produce our tokens
    assert main(["--model", "tiny", "--new-tokens", "0"]) == 2
