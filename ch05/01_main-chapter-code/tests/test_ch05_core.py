"""The model, the loss, the data loaders and decoding of chapter 5."""

import math

import pytest
import torch
import torch.nn.functional as F
from ch05_utils import (
    calc_loss_batch,
    create_train_val_loaders,
    generate,
    get_device,
    read_text_file,
    text_to_token_ids,
    the_verdict_path,
    token_ids_to_text,
)
from previous_chapters import GPT_CONFIG_124M, GPTModel, create_dataloader_v1, generate_text_simple, get_tokenizer

TINY = {**GPT_CONFIG_124M, "vocab_size": 1000, "context_length": 16, "emb_dim": 32, "n_heads": 4, "n_layers": 2,
        "drop_rate": 0.0}


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return GPTModel(TINY).eval()


@pytest.fixture(scope="module")
def verdict() -> str:
    return read_text_file(the_verdict_path())


def expected_param_count(cfg: dict) -> int:
    """GPT-2's parameter count, from its shapes."""
    d, v, n = cfg["emb_dim"], cfg["vocab_size"], cfg["n_layers"]
    qkv = 3 * d * d + (3 * d if cfg["qkv_bias"] else 0)
    per_block = qkv + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d) + 4 * d
    return v * d + cfg["context_length"] * d + n * per_block + 2 * d + v * d


def test_124m_shape_and_parameter_count():
    with torch.device("meta"):  # shapes only: no memory, no time
        model = GPTModel(GPT_CONFIG_124M)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == expected_param_count(GPT_CONFIG_124M)
    with torch.device("meta"):
        full_context = GPTModel({**GPT_CONFIG_124M, "context_length": 1024})
    n_full = sum(p.numel() for p in full_context.parameters())
    assert n_full == 163_009_536  # the figure the course gives for context 1024
    assert n_full - full_context.out_head.weight.numel() == 124_412_160  # "124M" with a tied head


def test_forward_output_shape(tiny_model):
    idx = torch.randint(0, TINY["vocab_size"], (3, 10))
    assert tiny_model(idx).shape == (3, 10, TINY["vocab_size"])


def test_model_is_causal(tiny_model):
    """Changing a later token must not change the logits at earlier positions."""
    idx = torch.randint(0, TINY["vocab_size"], (1, 12))
    changed = idx.clone()
    changed[0, 8] = (changed[0, 8] + 1) % TINY["vocab_size"]
    with torch.no_grad():
        a, b = tiny_model(idx), tiny_model(changed)
    assert torch.equal(a[0, :8], b[0, :8])
    assert not torch.allclose(a[0, 8:], b[0, 8:])


def test_input_longer_than_context_is_a_clear_error(tiny_model):
    with pytest.raises(ValueError, match="context length is 16"):
        tiny_model(torch.zeros(1, 17, dtype=torch.long))


def test_loss_by_hand_equals_cross_entropy(tiny_model):
    torch.manual_seed(1)
    inputs = torch.randint(0, TINY["vocab_size"], (2, 6))
    targets = torch.randint(0, TINY["vocab_size"], (2, 6))
    with torch.no_grad():
        logits = tiny_model(inputs)
    probas = torch.softmax(logits, dim=-1)
    target_probas = probas[torch.arange(2).unsqueeze(1), torch.arange(6), targets]
    loss_by_hand = -torch.log(target_probas).mean()
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    assert torch.allclose(loss_by_hand, loss, atol=1e-6)
    assert torch.allclose(calc_loss_batch(inputs, targets, tiny_model, torch.device("cpu")), loss)
    # Perplexity: exp(loss), the effective number of tokens the model hesitates between.
    # An untrained model is close to uniform, so its perplexity is near the vocabulary size.
    assert math.isclose(torch.exp(loss).item(), math.exp(loss.item()), rel_tol=1e-6)
    assert 0.5 * TINY["vocab_size"] < torch.exp(loss).item() < 2 * TINY["vocab_size"]


def test_token_id_round_trip():
    tokenizer = get_tokenizer()
    text = "Every effort moves you<|endoftext|>"
    ids = text_to_token_ids(text, tokenizer)
    assert ids.shape[0] == 1 and ids[0, -1].item() == 50256
    assert token_ids_to_text(ids, tokenizer) == text


def test_dataloader_windows_and_shifted_targets(verdict):
    tokenizer = get_tokenizer()
    token_ids = tokenizer.encode(verdict)
    max_length, stride, batch_size = 8, 4, 3
    loader = create_dataloader_v1(verdict, batch_size=batch_size, max_length=max_length, stride=stride,
                                  shuffle=False, drop_last=True)
    n_windows = len(range(0, len(token_ids) - max_length, stride))
    assert len(loader.dataset) == n_windows
    assert len(loader) == n_windows // batch_size
    inputs, targets = next(iter(loader))
    assert inputs.shape == targets.shape == (batch_size, max_length)
    assert torch.equal(inputs[:, 1:], targets[:, :-1])  # targets are the inputs shifted by one
    assert inputs[1, 0].item() == token_ids[stride] and targets[0, -1].item() == token_ids[max_length]


def test_chapter_split_has_expected_batches(verdict):
    train_loader, val_loader = create_train_val_loaders(verdict, GPT_CONFIG_124M, batch_size=2)
    tokenizer = get_tokenizer()
    split = int(0.9 * len(verdict))
    n_train = len(tokenizer.encode(verdict[:split]))
    n_val = len(tokenizer.encode(verdict[split:]))
    assert len(train_loader) == len(range(0, n_train - 256, 256)) // 2
    assert len(val_loader) == math.ceil(len(range(0, n_val - 256, 256)) / 2)


def test_text_shorter_than_a_window_is_a_clear_error():
    with pytest.raises(ValueError, match="too short for one batch"):
        create_train_val_loaders("Just a few words. " * 20, GPT_CONFIG_124M, batch_size=2)


def test_generate_temperature_zero_is_argmax(tiny_model):
    idx = torch.randint(0, TINY["vocab_size"], (2, 5))
    out = generate(tiny_model, idx, max_new_tokens=6, context_size=TINY["context_length"])
    assert torch.equal(out, generate_text_simple(tiny_model, idx, 6, TINY["context_length"]))


def test_top_k_1_equals_greedy_even_when_sampling(tiny_model):
    idx = torch.randint(0, TINY["vocab_size"], (2, 5))
    greedy = generate(tiny_model, idx, max_new_tokens=6, context_size=TINY["context_length"])
    sampled = generate(tiny_model, idx, max_new_tokens=6, context_size=TINY["context_length"],
                       temperature=1.5, top_k=1, generator=torch.Generator().manual_seed(3))
    assert torch.equal(greedy, sampled)


def test_top_k_never_samples_outside_the_top_k(tiny_model):
    idx = torch.randint(0, TINY["vocab_size"], (1, 5))
    with torch.no_grad():
        allowed = set(torch.topk(tiny_model(idx)[0, -1], k=3).indices.tolist())
    gen = torch.Generator().manual_seed(0)
    drawn = {generate(tiny_model, idx, 1, TINY["context_length"], temperature=5.0, top_k=3,
                      generator=gen)[0, -1].item() for _ in range(60)}
    assert drawn <= allowed
    assert len(drawn) > 1  # a high temperature does spread over the k candidates


def test_same_seed_same_text_and_batches(tiny_model):
    idx = torch.randint(0, TINY["vocab_size"], (3, 4))
    kwargs = dict(max_new_tokens=8, context_size=TINY["context_length"], temperature=1.0, top_k=50)
    a = generate(tiny_model, idx, generator=torch.Generator().manual_seed(42), **kwargs)
    b = generate(tiny_model, idx, generator=torch.Generator().manual_seed(42), **kwargs)
    c = generate(tiny_model, idx, generator=torch.Generator().manual_seed(43), **kwargs)
    assert a.shape == (3, 12)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_eos_id_stops_generation_without_appending_it(tiny_model):
    """As in the book: the loop breaks when the next token is eos_id, before appending it."""
    idx = torch.randint(0, TINY["vocab_size"], (1, 4))
    greedy = generate(tiny_model, idx, max_new_tokens=5, context_size=TINY["context_length"])
    for position in range(4, 9):
        eos = greedy[0, position].item()
        first = greedy[0, 4:].tolist().index(eos) + 4  # the first time greedy decoding produces it
        stopped = generate(tiny_model, idx, max_new_tokens=5, context_size=TINY["context_length"], eos_id=eos)
        assert torch.equal(stopped, greedy[:, :first])


def test_eos_id_pads_finished_rows_in_a_batch(tiny_model):
    idx = torch.randint(0, TINY["vocab_size"], (2, 4))
    greedy = generate(tiny_model, idx, max_new_tokens=6, context_size=TINY["context_length"])
    eos = greedy[0, 5].item()  # row 0 produces it by its second step
    out = generate(tiny_model, idx, max_new_tokens=6, context_size=TINY["context_length"], eos_id=eos)
    row0 = out[0, 4:].tolist()
    first = row0.index(eos)
    assert first <= 1 and row0[first:] == [eos] * (len(row0) - first)  # padded after it finished
    row1, row1_greedy = out[1, 4:].tolist(), greedy[1, 4:].tolist()
    until = row1_greedy.index(eos) + 1 if eos in row1_greedy else len(row1_greedy)
    assert row1[:until] == row1_greedy[:len(row1[:until])]  # the other row is unaffected
    if eos not in row1_greedy:
        assert len(row1) == 6  # it kept going until max_new_tokens


def test_generate_rejects_bad_settings(tiny_model):
    idx = torch.zeros(1, 2, dtype=torch.long)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            generate(tiny_model, idx, 1, 16, temperature=bad)
    with pytest.raises(ValueError, match="top_k"):
        generate(tiny_model, idx, 1, 16, top_k=0)


def test_unknown_device_is_a_clear_error():
    with pytest.raises(ValueError, match="Unknown device 'tpu'"):
        get_device("tpu")
    assert get_device("cpu") == torch.device("cpu")


def test_flops_per_token_formula():
    from benchmark_training import flops_per_token, matmul_weights

    cfg = {**TINY, "n_layers": 3}
    model = GPTModel(cfg)
    n = matmul_weights(model)
    assert n == sum(p.numel() for p in model.parameters()) - (cfg["vocab_size"] + cfg["context_length"]) * 32
    assert flops_per_token(n, cfg) == 6 * n + 12 * 3 * 16 * 32


def test_benchmark_script_prints_its_figures(capsys):
    from benchmark_training import main

    assert main(["--model", "tiny", "--steps", "1", "--warmup", "0", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for label in ("tokens/s", "GFLOP/s", "MFU vs measured matmul"):
        assert label in out
