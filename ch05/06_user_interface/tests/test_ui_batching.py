"""The batcher: sessions share forward passes, and each still gets exactly its own reply."""

import threading
import time

import pytest
import torch
from gpt_kv_cache import GPTModelKV, generate_stream
from previous_chapters import GPT_CONFIG_124M
from ui_batching import Batcher
from ui_chat_core import GenerationSettings, SettingsError, alone_token_ids, make_chat_model

CFG = {**GPT_CONFIG_124M, "context_length": 40, "emb_dim": 32, "n_heads": 4, "n_layers": 2, "drop_rate": 0.0}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPTModelKV(CFG).eval()


def alone(model, prompt, n, temperature=0.0, top_k=None, top_p=None, seed=0, eos_id=None, int8=False):
    """What the request gets without the batcher."""
    generator = torch.Generator().manual_seed(seed)
    return list(generate_stream(model, prompt, n, temperature, top_k, top_p, eos_id, generator, int8=int8))


# Eight sessions: greedy and sampled, prompts and replies of different lengths, one that
# outgrows the context window (6 + 40 > 40 tokens), one that stops at "end of text".
SESSIONS = [
    ([1, 2, 3], 10, {}),
    ([5] * 7, 30, {"temperature": 1.2, "top_k": 50, "seed": 3}),
    ([9, 8], 25, {"temperature": 0.8, "top_p": 0.9, "seed": 4}),
    ([4, 4, 4, 4, 4, 4], 40, {"temperature": 1.0, "seed": 5}),
    ([7], 5, {}),
    ([11, 12, 13, 14], 20, {"temperature": 2.0, "top_k": 5, "top_p": 0.5, "seed": 6}),
    ([100, 200], 18, {"temperature": 0.7, "seed": 7}),
    ([3, 1, 4, 1, 5], 22, {"temperature": 1.0, "seed": 8}),
]


def expected_replies(model, int8=False):
    replies = [alone(model, prompt, n, int8=int8, **settings) for prompt, n, settings in SESSIONS]
    assert len({tuple(r) for r in replies}) == len(SESSIONS)  # every session has its own reply to get right
    return replies


def test_eight_sessions_at_once_each_get_their_own_reply(model):
    batcher = Batcher(model, max_batch=8)
    try:
        requests = [batcher.submit(prompt, n, **settings) for prompt, n, settings in SESSIONS]
        assert [list(r) for r in requests] == expected_replies(model)
    finally:
        batcher.close()


def test_end_of_text_ends_one_row_only(model):
    free = alone(model, [1, 2, 3], 10)
    eos = free[3]
    batcher = Batcher(model, max_batch=4)
    try:
        stopped = batcher.submit([1, 2, 3], 10, eos_id=eos)
        other = batcher.submit([9, 8], 12, temperature=0.8, seed=4)
        assert list(stopped) == free[:free.index(eos)]
        assert list(other) == alone(model, [9, 8], 12, temperature=0.8, seed=4)
    finally:
        batcher.close()


def test_a_full_batch_queues_new_requests_instead_of_failing_them(model):
    batcher = Batcher(model, max_batch=3)
    seen = []
    try:
        requests = [batcher.submit(prompt, n, **settings) for prompt, n, settings in SESSIONS]
        watcher = threading.Thread(target=lambda: [seen.append(batcher.busy_rows) or time.sleep(0.002)
                                                   for _ in range(300)])
        watcher.start()
        replies = [list(r) for r in requests]
        watcher.join()
    finally:
        batcher.close()
    assert replies == expected_replies(model)
    assert max(seen) <= 3


def test_a_request_that_stops_leaves_the_batch_at_the_next_step(model):
    batcher = Batcher(model, max_batch=2)
    try:
        leaving = batcher.submit([5] * 7, 40, temperature=1.2, seed=3)
        staying = batcher.submit([9, 8], 30, temperature=0.8, seed=4)
        waiting = batcher.submit([1, 2, 3], 10)  # no free row until one leaves
        stream = leaving.stream()
        first = [next(stream) for _ in range(3)]
        stream.close()  # the reader went away (the generator's finally cancels the request)
        assert leaving.cancelled.is_set()
        assert list(waiting) == alone(model, [1, 2, 3], 10)  # got the freed row
        assert list(staying) == alone(model, [9, 8], 30, temperature=0.8, seed=4)
    finally:
        batcher.close()
    assert first == alone(model, [5] * 7, 3, temperature=1.2, seed=3)


def test_should_stop_cancels_a_request_mid_reply(model):
    batcher = Batcher(model, max_batch=2)
    try:
        # 500 tokens in a 40-token window (each step re-reads the window): seconds of work
        request = batcher.submit([1, 2], 500, temperature=1.0, seed=1)
        got = []
        for token in request.stream(should_stop=lambda: len(got) >= 4):
            got.append(token)
        deadline = time.monotonic() + 30
        while batcher.busy_rows and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(got) == 4 and batcher.busy_rows == 0
        assert len(got) + request.tokens.qsize() - 1 < 500  # it left the batch long before its end
    finally:
        batcher.close()


@pytest.mark.parametrize("settings,message", [
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": float("inf")}, "temperature"),
    ({"temperature": -1.0}, "temperature"),
    ({"top_k": -2}, "top_k"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
])
def test_the_batcher_refuses_settings_it_cannot_sample_with(model, settings, message):
    batcher = Batcher(model, max_batch=2)
    try:
        with pytest.raises(ValueError, match=message):
            batcher.submit([1, 2], 5, **settings)
        with pytest.raises(ValueError, match="empty"):
            batcher.submit([], 5)
        with pytest.raises(ValueError, match="token ids"):
            batcher.submit([CFG["vocab_size"]], 5)
        assert batcher.generate([1, 2], 3) == alone(model, [1, 2], 3)  # still serving
    finally:
        batcher.close()


def test_the_chat_batcher_refuses_settings_outside_the_apps_ranges(model):
    chat = make_chat_model(model, "tiny")
    try:
        for settings in ({"temperature": 2.5}, {"top_k": 60000}, {"max_new_tokens": 21}, {"top_p": 0.001}):
            with pytest.raises(SettingsError):
                chat.batcher.submit([1, 2], **{"max_new_tokens": 5, **settings})
        good = GenerationSettings(temperature=1.0, top_k=10, top_p=0.9, max_new_tokens=20, seed=2)
        assert chat.batcher.generate([1, 2], 20, temperature=1.0, top_k=10, top_p=0.9, seed=2, eos_id=None) == \
            alone(model, [1, 2], 20, 1.0, 10, 0.9, seed=2)
        assert alone_token_ids(chat, [1, 2], good) == alone(model, [1, 2], 20, 1.0, 10, 0.9, 2,
                                                            eos_id=chat.tokenizer.eot_token)
    finally:
        chat.batcher.close()


def test_int8_sessions_get_the_int8_reply_they_would_get_alone(model):
    batcher = Batcher(model, max_batch=8, int8=True)
    try:
        requests = [batcher.submit(prompt, n, **settings) for prompt, n, settings in SESSIONS]
        assert [list(r) for r in requests] == expected_replies(model, int8=True)
    finally:
        batcher.close()


def test_int8_refusal_reaches_the_caller_in_one_line():
    torch.manual_seed(0)
    broken = GPTModelKV(CFG).eval()
    with torch.no_grad():
        broken.out_head.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="out_head.weight holds NaN or infinite values"):
        Batcher(broken, int8=True)


def test_close_ends_waiting_and_running_requests(model):
    batcher = Batcher(model, max_batch=1)
    running = batcher.submit([1], 500)  # the window slides after 40 tokens: minutes for all 500
    waiting = batcher.submit([2], 5)
    batcher.close()
    assert len(list(running)) < 500 and list(waiting) == []
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit([1], 2)


def test_a_chat_reader_who_leaves_frees_the_row(model):
    """The apps' path: stream_in_thread over reply_pieces; the reader stops after three
    pieces (the user pressed stop or closed the tab) and the batcher drops the request."""
    import asyncio

    from ui_chat_core import reply_pieces, stream_in_thread

    chat = make_chat_model(model, "tiny", max_batch=2)
    settings = GenerationSettings(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=20, seed=9)

    async def read_three():
        pieces = []
        async for piece in stream_in_thread(lambda stop: reply_pieces(chat, [1, 2, 3], settings, stop)):
            pieces.append(piece)
            if len(pieces) == 3:
                break
        return pieces

    try:
        assert len(asyncio.run(read_three())) == 3
        deadline = time.monotonic() + 10
        while chat.batcher.busy_rows and time.monotonic() < deadline:
            time.sleep(0.01)
        assert chat.batcher.busy_rows == 0
        assert chat.batcher.generate([1, 2], 4) == alone(model, [1, 2], 4)  # the batcher goes on
    finally:
        chat.batcher.close()
