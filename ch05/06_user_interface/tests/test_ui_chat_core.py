"""Settings, prompt truncation, streaming text and the worker thread of the chat apps."""

import asyncio
import threading
import time

import pytest
import torch
from previous_chapters import get_tokenizer
from ui_chat_core import (
    GenerationSettings,
    SettingsError,
    TextStream,
    default_settings,
    make_chat_model,
    max_new_tokens_limit,
    prepare_prompt,
    reply_pieces,
    reply_text,
    stream_in_thread,
    validate_settings,
)

TOKENIZER = get_tokenizer()


#####################################
# Settings
#####################################

def test_valid_settings_are_converted_and_kept():
    raw = {"temperature": "0.3", "top_k": 10.0, "top_p": 0.5, "max_new_tokens": 20, "seed": 7, "unknown": 1}
    assert validate_settings(raw, 64, 50257) == GenerationSettings(0.3, 10, 0.5, 20, 7)


def test_missing_or_blank_values_keep_the_current_ones():
    base = GenerationSettings(1.0, 5, 0.9, 10, 3)
    assert validate_settings({"temperature": 0.0, "seed": "", "top_k": None}, 64, 50257, base=base) == \
        GenerationSettings(0.0, 5, 0.9, 10, 3)


@pytest.mark.parametrize("raw,message", [
    ({"temperature": -0.1}, "temperature must be between 0 and 2"),
    ({"temperature": 2.5}, "temperature must be between 0 and 2"),
    ({"top_k": -1}, "top_k must be between 0 and 50257"),
    ({"top_k": 3.5}, "top_k must be a whole number"),
    ({"top_p": 0}, "top_p must be between 0.01 and 1"),
    ({"max_new_tokens": 0}, "max_new_tokens must be between 1 and 32"),
    ({"max_new_tokens": 33}, "max_new_tokens must be between 1 and 32"),  # half of the context (64)
    ({"seed": -2}, "seed must be between -1 and"),
    ({"temperature": "warm"}, "temperature must be a number, got 'warm'"),
    ({"temperature": "nan"}, "temperature must be between 0 and 2, got nan"),
    ({"temperature": float("inf")}, "temperature must be between 0 and 2, got inf"),
    ({"top_p": "-inf"}, "top_p must be between 0.01 and 1, got -inf"),
    ({"seed": float("nan")}, "seed must be a whole number"),
])
def test_out_of_range_settings_are_rejected_with_the_reason(raw, message):
    with pytest.raises(SettingsError, match=message):
        validate_settings(raw, 64, 50257)


def test_every_problem_is_reported_at_once():
    with pytest.raises(SettingsError) as err:
        validate_settings({"temperature": 9, "top_k": -3, "seed": 1.5}, 64, 50257)
    assert all(name in str(err.value) for name in ("temperature", "top_k", "seed"))


def test_reply_length_limit_follows_the_context():
    assert max_new_tokens_limit(64) == 32
    assert max_new_tokens_limit(1024) == 512
    assert max_new_tokens_limit(100_000) == 1000
    assert default_settings(64).max_new_tokens == 32
    assert default_settings(1024).max_new_tokens == GenerationSettings.max_new_tokens


#####################################
# Prompts
#####################################

def test_short_prompt_is_kept_whole():
    ids, notice = prepare_prompt("Every effort moves you", TOKENIZER, 64, 32)
    assert ids == TOKENIZER.encode("Every effort moves you") and notice is None


def test_long_prompt_keeps_its_last_tokens_with_a_notice():
    text = " ".join(f"word{i}" for i in range(100))
    full = TOKENIZER.encode(text)
    ids, notice = prepare_prompt(text, TOKENIZER, 64, 20)
    assert ids == full[-44:]  # 64 - 20 tokens left for the prompt
    assert f"has {len(full)} tokens" in notice and "last 44 tokens" in notice


def test_empty_prompts_are_refused():
    for text in ("", "   \n\t"):
        with pytest.raises(ValueError, match="empty"):
            prepare_prompt(text, TOKENIZER, 64, 20)


def test_special_token_text_is_encoded_as_plain_text():
    ids, _ = prepare_prompt("a <|endoftext|> b", TOKENIZER, 64, 20)
    assert TOKENIZER.eot_token not in ids and TOKENIZER.decode(ids) == "a <|endoftext|> b"


#####################################
# Streaming text
#####################################

def test_text_stream_holds_back_split_characters():
    ids = TOKENIZER.encode("héllo 🙂 wörld 日本語")
    # At least one token of this text is an incomplete UTF-8 sequence on its own.
    assert any(TOKENIZER.decode_single_token_bytes(i).decode("utf-8", errors="replace").count("\ufffd")
               for i in ids)
    stream = TextStream(TOKENIZER)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "\ufffd" not in "".join(pieces)
    assert "".join(pieces) == TOKENIZER.decode(ids)


def test_text_stream_matches_decode_for_invalid_byte_sequences():
    emoji = TOKENIZER.encode("🙂")
    for ids in ([emoji[0]], [emoji[0], 11, emoji[-1]], emoji[::-1]):  # cut short, interrupted, reversed
        stream = TextStream(TOKENIZER)
        assert "".join([stream.push(i) for i in ids] + [stream.flush()]) == TOKENIZER.decode(ids)


@pytest.mark.parametrize("settings", [
    GenerationSettings(temperature=0.0, max_new_tokens=30),
    GenerationSettings(temperature=1.2, top_k=100, top_p=0.9, max_new_tokens=30, seed=11),
    GenerationSettings(temperature=2.0, top_k=0, top_p=1.0, max_new_tokens=32, seed=3),
])
def test_streamed_pieces_add_up_to_the_whole_reply(tiny_chat, settings):
    prompt_ids, _ = prepare_prompt("Every effort moves you", tiny_chat.tokenizer, tiny_chat.context_length,
                                   settings.max_new_tokens)
    pieces = list(reply_pieces(tiny_chat, prompt_ids, settings))
    whole = reply_text(tiny_chat, prompt_ids, settings)
    assert len(pieces) > 5 and "".join(pieces) == whole


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_streaming_works_on_every_device(tiny_chat, device):
    from gpt_kv_cache import GPTModelKV

    model = GPTModelKV({"vocab_size": 50257, "context_length": 64, "emb_dim": 32, "n_heads": 2, "n_layers": 2,
                        "drop_rate": 0.0, "qkv_bias": False})
    model.load_state_dict(tiny_chat.model.state_dict())
    chat = make_chat_model(model.to(device), "tiny")
    settings = GenerationSettings(temperature=1.0, top_k=50, top_p=0.9, max_new_tokens=30, seed=1)
    ids = chat.tokenizer.encode("Every effort moves you")
    assert "".join(reply_pieces(chat, ids, settings)) == reply_text(chat, ids, settings)


def test_a_fixed_seed_repeats_the_reply_and_seed_minus_one_does_not(tiny_chat):
    ids = tiny_chat.tokenizer.encode("Hello")
    fixed = GenerationSettings(temperature=1.5, top_k=0, top_p=1.0, max_new_tokens=20, seed=5)
    assert reply_text(tiny_chat, ids, fixed) == reply_text(tiny_chat, ids, fixed)
    fresh = GenerationSettings(temperature=1.5, top_k=0, top_p=1.0, max_new_tokens=20, seed=-1)
    assert len({reply_text(tiny_chat, ids, fresh) for _ in range(3)}) > 1


def test_reply_stops_at_end_of_text_and_hides_it(tiny_chat):
    """A model that always predicts <|endoftext|> replies with nothing."""
    from gpt_kv_cache import GPTModelKV

    model = GPTModelKV({"vocab_size": 50257, "context_length": 64, "emb_dim": 32, "n_heads": 2, "n_layers": 2,
                        "drop_rate": 0.0, "qkv_bias": False})
    with torch.no_grad():
        model.final_norm.scale.zero_()
        model.final_norm.shift.fill_(1.0)  # every position's final vector: all ones
        model.out_head.weight.zero_()
        model.out_head.weight[tiny_chat.tokenizer.eot_token] = 1.0
    chat = make_chat_model(model, "eos")
    settings = GenerationSettings(temperature=0.0, max_new_tokens=10)
    assert list(reply_pieces(chat, [1, 2, 3], settings)) == []
    assert reply_text(chat, [1, 2, 3], settings) == ""


def test_chat_models_are_in_eval_mode(tiny_chat):
    assert not tiny_chat.model.training
    assert not any(module.training for module in tiny_chat.model.modules())


#####################################
# The worker thread
#####################################

def slow_pieces(n, delay, started=None):
    def make(should_stop):
        if started is not None:
            started.set()
        for i in range(n):
            if should_stop():
                return
            time.sleep(delay)  # blocks its thread, like a forward pass
            yield f"<{i}>"
    return make


def test_pieces_arrive_in_order_and_the_event_loop_stays_free():
    async def run():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.create_task(ticker())
        pieces = [piece async for piece in stream_in_thread(slow_pieces(10, 0.05))]
        task.cancel()
        return pieces, ticks

    pieces, ticks = asyncio.run(run())
    assert pieces == [f"<{i}>" for i in range(10)]
    assert ticks >= 10  # 0.5 s of generating: the loop kept running other work meanwhile


def test_errors_in_the_worker_reach_the_caller():
    def failing(should_stop):
        yield "a"
        raise ValueError("boom")

    async def run():
        return [piece async for piece in stream_in_thread(failing)]

    with pytest.raises(ValueError, match="boom"):
        asyncio.run(run())


def test_a_consumer_that_leaves_stops_the_worker():
    produced = []

    def make(should_stop):
        for i in range(1000):
            if should_stop():
                return
            time.sleep(0.01)
            produced.append(i)
            yield str(i)

    async def run():
        async for piece in stream_in_thread(make):
            if piece == "3":
                break  # like the user pressing stop (Chainlit cancels the task)
        await asyncio.sleep(0.3)

    before = threading.active_count()
    asyncio.run(run())
    time.sleep(0.1)
    assert len(produced) < 100
    assert threading.active_count() <= before


def test_a_file_without_causal_masks_gets_them_back(tiny_chat, tmp_path):
    """Files saved before the mask was part of the state dict lack it; the model built
    without initialization must not keep whatever its memory held there."""
    from ch05_utils import save_checkpoint_atomic
    from ui_chat_core import load_model_file

    model = tiny_chat.model
    config = {"vocab_size": 50257, "context_length": model.context_length, "emb_dim": 32, "n_heads": 2,
              "n_layers": 2, "drop_rate": 0.1, "qkv_bias": False}
    state = {k: v for k, v in model.state_dict().items() if not k.endswith(".att.mask")}
    save_checkpoint_atomic({"model": state, "config": config}, tmp_path / "old.pth")
    model = load_model_file(tmp_path / "old.pth")
    idx = torch.randint(0, 50257, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), tiny_chat.model(idx))
