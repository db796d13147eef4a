"""The KV-cache model gives the chapter's model's results, only faster (float32, int8, batched rows)."""

import gpt_kv_cache
import pytest
import torch
import torch.nn as nn
from ch05_utils import generate
from gpt_kv_cache import (
    GPTModelKV,
    decode_rows,
    forward_cached,
    generate_kv,
    generate_stream,
    inference_weights,
    packing_available,
    quantize_int8,
    sample_next_token,
)
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


def seeded(seed, device="cpu"):
    return torch.Generator(device=device).manual_seed(seed)


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
    expected = generate(reference, idx, 15, CFG["context_length"], temperature=1.3, top_k=20,
                        generator=seeded(5, device))
    got = generate_kv(cached, idx, 15, temperature=1.3, top_k=20, generator=seeded(5, device))
    assert torch.equal(got, expected)
    other = generate_kv(cached, idx, 15, temperature=1.3, top_k=20, generator=seeded(6, device))
    assert not torch.equal(other, expected)  # the seed matters: the comparison above can fail


def test_generation_stops_before_the_end_token_like_the_books_generate(models):
    reference, cached = models
    device = cached.tok_emb.weight.device
    idx = torch.randint(0, CFG["vocab_size"], (1, 3), device=device)
    free = list(generate_stream(cached, idx[0].tolist(), 12))
    stop_at = free[4]
    first = free.index(stop_at)
    assert list(generate_stream(cached, idx[0].tolist(), 12, eos_id=stop_at)) == free[:first]
    expected = generate(reference, idx, 12, CFG["context_length"], eos_id=stop_at)
    assert torch.equal(generate_kv(cached, idx, 12, eos_id=stop_at), expected)


@pytest.mark.slow
def test_the_compiled_step_gives_the_chapters_tokens():
    """torch.compile'd one-token steps (the default outside these tests): greedy and
    seeded sampling equal the chapter's generate; int8 compiled equals int8 plain."""
    torch.manual_seed(1)
    model = GPTModelKV({**CFG, "drop_rate": 0.0, "qkv_bias": True}).eval()
    idx = torch.randint(0, CFG["vocab_size"], (1, 5))
    assert torch.equal(generate_kv(model, idx, 30, use_compile=True), generate(model, idx, 30, 24))
    expected = generate(model, idx, 15, 24, temperature=1.1, top_k=40, generator=seeded(3))
    assert torch.equal(generate_kv(model, idx, 15, 1.1, 40, generator=seeded(3), use_compile=True), expected)
    assert torch.equal(generate_kv(model, idx, 15, int8=True, use_compile=True),
                       generate_kv(model, idx, 15, int8=True, use_compile=False))


#####################################
# Several rows at once
#####################################

def test_rows_at_different_positions_match_decoding_each_alone(models):
    """decode_rows: each row attends to its own positions only, so batching rows of
    different lengths gives each row the logits it gets alone."""
    _, cached = models
    device = cached.tok_emb.weight.device
    weights = inference_weights(cached)
    lengths = [3, 9, 1, 6]
    prompts = [torch.randint(0, CFG["vocab_size"], (1, n), device=device) for n in lengths]
    batch = cached.new_cache(batch_size=len(lengths))
    alone = []
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            forward_cached(weights, prompt, batch.rows(i, i + 1))
            single = cached.new_cache()
            forward_cached(weights, prompt, single)
            position = torch.tensor([lengths[i]], device=device)
            alone.append(decode_rows(weights, torch.tensor([7], device=device), position, single))
        together = decode_rows(weights, torch.full((4,), 7, device=device), torch.tensor(lengths, device=device),
                               batch)
    torch.testing.assert_close(together, torch.cat(alone), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not packing_available(GPTModel(CFG)), reason="oneDNN weight packing is not available here")
def test_packed_weights_compute_the_same_products():
    torch.manual_seed(2)
    model = GPTModelKV({**CFG, "qkv_bias": True}).eval()
    plain, packed = inference_weights(model), inference_weights(model, packed=True)
    assert packed.head.packed is not None and plain.head.packed is None
    idx = torch.randint(0, CFG["vocab_size"], (3, 5))
    with torch.no_grad():
        expected = forward_cached(plain, idx, model.new_cache(batch_size=3))
        torch.testing.assert_close(forward_cached(packed, idx, model.new_cache(batch_size=3)), expected,
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [768, 5000, 6400, 8193])
def test_the_compiled_products_sum_long_rows_in_chunks_with_the_same_result(k):
    """Rows over 4,096 (GPT-2 1558M's 6,400) are summed in equal chunks, so Inductor
    does not fall back to its slow cascade sum; the result is still x @ weight.T."""
    torch.manual_seed(4)
    x, weight = torch.randn(2, 3, k), torch.randn(5, k)
    torch.testing.assert_close(gpt_kv_cache._multiply_and_sum(x, weight), x @ weight.T, rtol=1e-4, atol=1e-3)


#####################################
# int8
#####################################

def test_int8_scales_each_output_channel_by_its_largest_weight():
    weight = torch.tensor([[0.5, -1.0, 0.25], [0.0, 0.0, 0.0], [100.0, 3.0, -50.0]])
    quantized, scale = quantize_int8(weight)
    assert quantized.dtype == torch.int8
    torch.testing.assert_close(scale, torch.tensor([1.0 / 127, 1.0, 100.0 / 127]))
    assert quantized[:, 1].tolist() == [-127, 0, 4] and quantized[2, 0] == 127
    error = (quantized.float() * scale[:, None] - weight).abs()
    assert (error <= scale[:, None] / 2 + 1e-6).all()  # rounding: at most half a step per channel


@pytest.mark.parametrize("rows", [1, 255, 256, 700])
def test_int8_products_in_plain_pytorch_convert_blocks_of_rows(rows, monkeypatch):
    """The prompt's pass converts int8 rows a block at a time; any row count gives
    exactly the product with the whole matrix converted."""
    monkeypatch.setattr(gpt_kv_cache, "INT8_ROWS_PER_BLOCK", 256)
    torch.manual_seed(5)
    weight = torch.randint(-127, 128, (rows, 48), dtype=torch.int8)
    x = torch.randn(2, 7, 48)
    torch.testing.assert_close(gpt_kv_cache._int8_linear(x, weight), x @ weight.float().T)


def test_int8_logits_stay_close_and_mostly_agree_on_the_top_token():
    torch.manual_seed(3)
    model = GPTModelKV({**CFG, "context_length": 64, "emb_dim": 64, "drop_rate": 0.0}).eval()
    idx = torch.randint(0, CFG["vocab_size"], (4, 64))
    with torch.no_grad():
        fp32 = forward_cached(inference_weights(model), idx, model.new_cache(batch_size=4))
        int8 = forward_cached(inference_weights(model, int8=True), idx, model.new_cache(batch_size=4))
    relative = (int8 - fp32).norm() / fp32.norm()
    agreement = (int8.argmax(-1) == fp32.argmax(-1)).float().mean()
    assert relative < 0.02 and agreement > 0.9, (relative, agreement)


def test_int8_copies_are_made_once_and_renewed_when_the_weights_change():
    model = GPTModelKV(CFG).eval()
    first = inference_weights(model, int8=True)
    assert inference_weights(model, int8=True) is first
    with torch.no_grad():
        model.out_head.weight.mul_(2)  # changed in place, as load_state_dict does
    second = inference_weights(model, int8=True)
    assert second is not first
    torch.testing.assert_close(second.head.scale, first.head.scale * 2)


@pytest.mark.parametrize("break_model,message", [
    (lambda m: m.trf_blocks[0].ff.layers[0].weight.data.__setitem__((0, 0), float("nan")), "NaN or infinite"),
    (lambda m: m.to(torch.bfloat16), "float32 models"),
    (lambda m: setattr(m.trf_blocks[1].att, "W_query", nn.Sequential(nn.Linear(32, 32))), "not a plain nn.Linear"),
])
def test_int8_refuses_models_it_cannot_quantize(break_model, message):
    model = GPTModelKV(CFG).eval()
    break_model(model)
    with pytest.raises(ValueError, match=message) as err:
        inference_weights(model, int8=True)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=message):
        list(generate_stream(model, [1, 2], 3, int8=True))


def test_int8_refuses_a_model_that_is_not_a_gpt_model_or_not_loaded():
    with pytest.raises(ValueError, match="GPTModel"):
        inference_weights(nn.Linear(2, 2), int8=True)
    with torch.device("meta"):
        model = GPTModelKV(CFG)
    with pytest.raises(ValueError, match="never loaded"):
        inference_weights(model, int8=True)


#####################################
# Sampling and errors
#####################################

def test_top_p_keeps_the_smallest_set_of_tokens_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    generator = torch.Generator().manual_seed(0)

    def draws(top_p, top_k=None):
        samples = [sample_next_token(logits, 1.0, top_k=top_k, top_p=top_p, generator=generator)
                   for _ in range(3000)]
        return torch.cat(samples).flatten()

    assert set(draws(0.5).tolist()) == {0}  # token 0 alone has 0.5
    nucleus = draws(0.7)  # tokens 0 and 1 (0.8), renormalized to 0.625 / 0.375
    assert set(nucleus.tolist()) == {0, 1}
    assert abs((nucleus == 0).float().mean().item() - 0.625) < 0.04
    assert set(draws(1.0).tolist()) == {0, 1, 2, 3}
    assert set(draws(0.99, top_k=3).tolist()) == {0, 1, 2}  # top-k first, then top-p among the rest


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
        with pytest.raises(RuntimeError, match="eval"):
            list(generate_stream(cached, [1], 2))
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
    assert "GB/s" in out and out.count("tokens/s  (") == 4  # ours, int8, plain, transformers
    assert "'ours, KV cache, plain' vs ours: 8/8 equal" in out and "'transformers generate' vs ours: 8/8" in out
    assert main(["--model", "tiny", "--breakdown"]) == 0
    out = capsys.readouterr().out
    assert out.count("output head") == 2 and out.count("transformer blocks") == 2  # float32 and int8
    for bad in (["--new-tokens", "0"], ["--threads", "0"], ["--prompt", ""]):
        assert main(["--model", "tiny", *bad]) == 2


@pytest.mark.slow
def test_without_a_cpp_compiler_decoding_falls_back_to_plain_pytorch(tmp_path):
    """torch.compile needs a C++ compiler on the CPU; without one, a one-line note and
    the same tokens from the plain step."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = ("import torch\n"
              "from gpt_kv_cache import GPTModelKV, generate_stream\n"
              "torch.manual_seed(0)\n"
              f"m = GPTModelKV({dict(CFG, drop_rate=0.0)!r}).eval()\n"
              "a = list(generate_stream(m, [1, 2], 6, use_compile=True))\n"
              "print(a == list(generate_stream(m, [1, 2], 6, use_compile=False)))\n")
    env = {**os.environ, "CXX": str(tmp_path / "no-compiler"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache"),
           "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"
    notes = [line for line in result.stderr.splitlines() if line.startswith("note: torch.compile is not available")]
    assert len(notes) == 1 and "Traceback" not in result.stderr
