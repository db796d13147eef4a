"""The Chainlit handlers of both apps, called directly in a Chainlit context that records
what would be sent to the browser (no server, no browser: see test_ui_server.py for those)."""

import asyncio
import importlib.util
import re
import uuid
from pathlib import Path

import chainlit as cl
import pytest
import torch
from chainlit.context import ChainlitContext, context_var
from chainlit.emitter import BaseChainlitEmitter
from chainlit.session import HTTPSession

from ui_chainlit_handlers import EMPTY_MESSAGE_REPLY, SETTINGS_KEY, MarkdownEscaper
from ui_chat_core import GenerationSettings, prepare_prompt, reply_text

APP_DIR = Path(__file__).resolve().parent.parent
REPO_TESTS = APP_DIR.parent.parent / "tests"


class RecordingEmitter(BaseChainlitEmitter):
    """Keeps every event instead of sending it over a websocket."""

    def __init__(self, session):
        super().__init__(session)
        self.events = []

    async def emit(self, event, data):
        self.events.append((event, data))

    async def send_step(self, step_dict):
        self.events.append(("new_message", dict(step_dict)))

    async def stream_start(self, step_dict):
        self.events.append(("stream_start", dict(step_dict)))

    async def send_token(self, id, token, is_sequence=False, is_input=False):
        self.events.append(("stream_token", token))

    def set_chat_settings(self, settings):
        self.session.chat_settings = settings


def run_session(steps) -> list:
    """Run `await steps()` inside one fresh Chainlit session; return the events it emitted."""
    async def main():
        session = HTTPSession(id=str(uuid.uuid4()), client_type="webapp")
        emitter = RecordingEmitter(session)
        context_var.set(ChainlitContext(session, emitter))
        await steps()
        return emitter.events

    return asyncio.run(main())


def messages(events) -> list[str]:
    return [data["output"] for name, data in events if name == "new_message"]


def load_app(name: str, monkeypatch, **env):
    """Import app_own.py / app_orig.py afresh with the given environment."""
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", APP_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def app_own(tiny_checkpoint):
    with pytest.MonkeyPatch.context() as monkeypatch:
        yield load_app("app_own", monkeypatch, CH05_CHECKPOINT=tiny_checkpoint, CH05_DEVICE="cpu")


def test_app_own_loads_the_checkpoint_in_eval_mode(app_own):
    assert app_own.LOAD_ERROR is None
    assert app_own.CHAT.context_length == 64 and not app_own.CHAT.model.training


def test_app_own_offers_the_courses_names(app_own, tiny_checkpoint):
    """The course's app defines get_model_and_tokenizer() and module-level tokenizer,
    model, model_config and device; ours serves the same objects under those names."""
    tokenizer, model, model_config = app_own.get_model_and_tokenizer()
    assert tokenizer is app_own.tokenizer is app_own.CHAT.tokenizer
    assert model is app_own.model is app_own.CHAT.model
    saved = torch.load(tiny_checkpoint, weights_only=True)["config"]
    assert {k: model_config[k] for k in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers",
                                         "qkv_bias")} == {k: saved[k] for k in ("vocab_size", "context_length",
                                                                             "emb_dim", "n_heads", "n_layers",
                                                                             "qkv_bias")}
    assert app_own.model_config == model_config and app_own.device == torch.device("cpu")


def test_get_model_and_tokenizer_without_a_model_raises_the_pages_message(monkeypatch, tmp_path):
    app = load_app("app_own", monkeypatch, CH05_CHECKPOINT=tmp_path / "missing.pth")
    assert app.model is None and app.device is None
    with pytest.raises(RuntimeError, match="No checkpoint at"):
        app.get_model_and_tokenizer()


def test_message_reply_streams_and_matches_the_model(app_own, unescape):
    settings = GenerationSettings(temperature=1.0, top_k=40, top_p=0.9, max_new_tokens=25, seed=42)

    async def steps():
        await app_own.on_chat_start()
        cl.user_session.set(SETTINGS_KEY, settings)
        await app_own.main(cl.Message(content="Every effort moves you"))

    events = run_session(steps)
    chat = app_own.CHAT
    prompt_ids, _ = prepare_prompt("Every effort moves you", chat.tokenizer, chat.context_length, 25)
    expected = reply_text(chat, prompt_ids, settings)

    names = [name for name, _ in events]
    assert "chat_settings" in names  # the settings panel was sent at the start
    start = names.index("stream_start")
    streamed = [events[start][1]["output"]] + [data for name, data in events[start:] if name == "stream_token"]
    assert len(streamed) > 5  # token by token, not all at once
    assert unescape("".join(streamed)) == expected
    assert unescape(messages(events)[-1]) == expected  # the final message holds the whole reply


def test_empty_message_gets_a_hint_and_no_generation(app_own):
    async def steps():
        await app_own.on_chat_start()
        await app_own.main(cl.Message(content="  \n "))

    events = run_session(steps)
    assert messages(events)[-1] == EMPTY_MESSAGE_REPLY
    assert "stream_start" not in [name for name, _ in events]


def test_long_prompt_is_truncated_with_a_notice(app_own):
    async def steps():
        await app_own.on_chat_start()
        await app_own.main(cl.Message(content="word " * 200))

    sent = messages(run_session(steps))
    assert any("only its last 32 tokens were used" in text for text in sent)  # 64 - 32 new tokens
    assert "stream_start" in [name for name, _ in run_session(steps)]


def test_settings_are_validated_and_kept_per_session(app_own):
    seen = {}

    async def first_session():
        await app_own.on_chat_start()
        await app_own.on_settings_update({"temperature": 0.0, "top_k": 5, "top_p": 0.5, "max_new_tokens": 10,
                                          "seed": 1})
        seen["good"] = cl.user_session.get(SETTINGS_KEY)
        seen["confirmation"] = messages(context_var.get().emitter.events)[-1]
        await app_own.on_settings_update({"temperature": 5.0, "max_new_tokens": 1000, "seed": 1})
        seen["after_bad"] = cl.user_session.get(SETTINGS_KEY)

    async def second_session():
        await app_own.on_chat_start()
        seen["other"] = cl.user_session.get(SETTINGS_KEY)

    events = run_session(first_session)
    run_session(second_session)
    assert seen["good"] == GenerationSettings(0.0, 5, 0.5, 10, 1)
    assert seen["confirmation"] == ("Settings applied: temperature 0, top-k 5, top-p 0.5, max new tokens 10, "
                                    "seed 1.")
    assert seen["after_bad"] == seen["good"]  # nothing of the bad update was applied
    rejection = messages(events)[-1]
    assert "Settings not changed" in rejection and "temperature" in rejection and "max_new_tokens" in rejection
    assert [name for name, _ in events].count("chat_settings") == 2  # the panel was reset to the kept values
    assert seen["other"] == GenerationSettings(max_new_tokens=32)  # another session keeps the defaults


def test_app_own_without_checkpoint_says_how_to_make_one(monkeypatch, tmp_path):
    app = load_app("app_own", monkeypatch, CH05_CHECKPOINT=tmp_path / "missing.pth")
    assert app.CHAT is None and "gpt_train.py" in app.LOAD_ERROR and "CH05_CHECKPOINT" in app.LOAD_ERROR

    async def steps():
        await app.on_chat_start()
        await app.main(cl.Message(content="hello"))

    sent = messages(run_session(steps))
    assert len(sent) == 2 and all("gpt_train.py" in text for text in sent)


@pytest.mark.parametrize("layout", ["model.pth", "model_and_optimizer.pth"])
def test_app_own_finds_and_loads_the_books_files(app_own, monkeypatch, tmp_path, layout):
    """The book's notebook saves model.pth (a plain state dict) and model_and_optimizer.pth
    beside itself; without CH05_CHECKPOINT the app looks for them after our checkpoint."""
    import ch05_utils

    state = app_own.CHAT.model.state_dict()
    if layout == "model.pth":
        torch.save(state, tmp_path / layout)
    else:
        torch.save({"model_state_dict": state, "optimizer_state_dict": {"state": {}, "param_groups": []}},
                   tmp_path / layout)
    monkeypatch.delenv("CH05_CHECKPOINT", raising=False)
    monkeypatch.setattr(app_own, "DEFAULT_CHECKPOINTS", (tmp_path / "output" / "checkpoint.pth", tmp_path / layout))
    monkeypatch.setitem(ch05_utils.GPT2_HEADS_BY_EMB_DIM, 32, 2)  # the tiny model's width and heads
    assert app_own.find_checkpoint() == tmp_path / layout
    chat, error = app_own.load_model()
    try:
        assert error is None and layout in chat.name
        idx = torch.tensor([[1, 2, 3]])
        with torch.no_grad():
            torch.testing.assert_close(chat.model(idx), app_own.CHAT.model(idx))
    finally:
        chat.batcher.close()


@pytest.mark.parametrize("env,message", [({"CH05_INT8": "yes"}, "CH05_INT8 must be 1"),
                                         ({"CH05_MAX_BATCH": "0"}, "CH05_MAX_BATCH must be a whole number"),
                                         ({"CH05_DEVICE": "tpu"}, "tpu")])
def test_app_own_refuses_bad_settings_in_one_line(monkeypatch, tiny_checkpoint, env, message):
    app = load_app("app_own", monkeypatch, CH05_CHECKPOINT=tiny_checkpoint, **env)
    assert app.CHAT is None and message in app.LOAD_ERROR


def test_app_own_with_int8_weights_says_so(monkeypatch, tiny_checkpoint):
    app = load_app("app_own", monkeypatch, CH05_CHECKPOINT=tiny_checkpoint, CH05_DEVICE="cpu", CH05_INT8="1")
    try:
        assert app.LOAD_ERROR is None and app.CHAT.int8 and "int8" in app.CHAT.name
    finally:
        app.CHAT.batcher.close()


def test_app_own_with_a_broken_checkpoint_shows_the_error(monkeypatch, tmp_path):
    broken = tmp_path / "checkpoint.pth"
    broken.write_bytes(b"not a checkpoint")
    app = load_app("app_own", monkeypatch, CH05_CHECKPOINT=broken)
    assert app.CHAT is None and "Could not load" in app.LOAD_ERROR


@pytest.mark.parametrize("text", ["# Title\n\n* item _x_ [a](b)\n    code\n1. one", "a\\b `c` <d> ~e~ | f", "plain"])
def test_markdown_escaper_round_trips_in_any_pieces(text, unescape):
    whole = MarkdownEscaper().escape(text)
    assert unescape(whole) == text
    escaper = MarkdownEscaper()
    assert "".join(escaper.escape(ch) for ch in text) == whole  # streamed one character at a time
    assert not re.search(r"(^|\n) {4}", whole)  # no indented code block


def test_app_orig_loads_openai_weights_and_matches_transformers(monkeypatch, tmp_path, unescape):
    """A tiny random GPT-2 from transformers, handed to the app in OpenAI's layout.

    Writing it as a TensorFlow checkpoint takes a minute on a busy machine (the tests of
    gpt_download.py do that and check the reading); here `download_and_load_gpt2`
    returns what it would have read, and the app does the rest: config, weights, chat.
    """
    monkeypatch.syspath_prepend(str(REPO_TESTS))
    import gpt_download
    from openai_checkpoint import TINY_HPARAMS, make_hf_model, openai_variables

    hf_model = make_hf_model(TINY_HPARAMS)
    params = gpt_download.params_from_tf_variables(openai_variables(hf_model), TINY_HPARAMS["n_layer"])
    requested = []

    def fake_download(model_size, models_dir, *args, **kwargs):
        requested.append((model_size, Path(models_dir)))
        return dict(TINY_HPARAMS), params

    monkeypatch.setattr(gpt_download, "download_and_load_gpt2", fake_download)
    app = load_app("app_orig", monkeypatch, GPT2_MODELS_DIR=tmp_path / "models", GPT2_MODEL_SIZE="355M",
                   CH05_DEVICE="cpu")
    assert requested == [("355M", tmp_path / "models")]
    assert app.LOAD_ERROR is None and not app.CHAT.model.training and "355M" in app.CHAT.name
    idx = torch.tensor([app.CHAT.tokenizer.encode("Every effort moves you")])
    with torch.no_grad():
        torch.testing.assert_close(app.CHAT.model(idx), hf_model(idx).logits, rtol=1e-4, atol=1e-4)
        expected = hf_model.generate(idx, max_new_tokens=15, min_new_tokens=15, do_sample=False,
                                     attention_mask=torch.ones_like(idx), pad_token_id=0)[0, idx.shape[1]:]
    greedy = GenerationSettings(temperature=0.0, max_new_tokens=15)

    async def steps():
        await app.on_chat_start()
        cl.user_session.set(SETTINGS_KEY, greedy)
        await app.main(cl.Message(content="Every effort moves you"))

    expected_text = app.CHAT.tokenizer.decode([t for t in expected.tolist() if t != app.CHAT.tokenizer.eot_token])
    assert unescape(messages(run_session(steps))[-1]) == expected_text.split("<|endoftext|>")[0]


def test_app_orig_rejects_an_unknown_size(monkeypatch, tmp_path):
    app = load_app("app_orig", monkeypatch, GPT2_MODEL_SIZE="7B", GPT2_MODELS_DIR=tmp_path)
    assert app.CHAT is None and "124M" in app.LOAD_ERROR
