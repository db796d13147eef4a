"""Chat in the browser with OpenAI's pretrained GPT-2, loaded into the chapter's model.

    chainlit run app_orig.py                   # then open http://127.0.0.1:8000
    GPT2_MODEL_SIZE=355M chainlit run app_orig.py

    CH05_INT8=1 chainlit run app_orig.py       # int8 weights: faster replies, a little less exact
    CH05_MAX_BATCH=4 chainlit run app_orig.py  # at most 4 sessions generate together (default 8)

The first start downloads the weights (about 500 MB for 124M) into GPT2_MODELS_DIR
(default: ./gpt2) with gpt_download.py; later starts need no network. GPT2_MODEL_SIZE
is one of 124M (default), 355M, 774M, 1558M. GPT2_BASE_URL points the download at a
mirror or a local folder. CH05_DEVICE chooses the device (default: auto).
"""

import os
import sys
import time
from pathlib import Path

import chainlit as cl
from ch05_utils import get_device
from gpt_download import GPT2_CONFIGS, config_from_hparams, download_and_load_gpt2, load_weights_into_gpt
from gpt_kv_cache import GPTModelKV
from ui_chainlit_handlers import answer, start_chat, update_settings
from ui_chat_core import ChatModel, course_names, int8_requested, make_chat_model, max_batch_requested, warm_up

MODEL_SIZE_ENV = "GPT2_MODEL_SIZE"
MODELS_DIR_ENV = "GPT2_MODELS_DIR"
DEFAULT_MODELS_DIR = Path(__file__).resolve().parent / "gpt2"


def load_model() -> tuple[ChatModel | None, str | None]:
    """GPT-2 with OpenAI's weights, or None and a message for the page saying what went wrong."""
    size = os.environ.get(MODEL_SIZE_ENV) or "124M"
    if size not in GPT2_CONFIGS:
        return None, f"{MODEL_SIZE_ENV}={size!r} is not a GPT-2 size: use one of {', '.join(GPT2_CONFIGS)}."
    models_dir = Path(os.environ.get(MODELS_DIR_ENV) or DEFAULT_MODELS_DIR)
    try:
        start = time.perf_counter()
        settings, params = download_and_load_gpt2(size, models_dir)
        model = GPTModelKV(config_from_hparams(settings))
        load_weights_into_gpt(model, params)
        chat = make_chat_model(model.to(get_device(os.environ.get("CH05_DEVICE", "auto"))), f"OpenAI GPT-2 {size}",
                               int8=int8_requested(), max_batch=max_batch_requested())
        warm_up(chat)
        print(f"GPT-2 {size} ready after {time.perf_counter() - start:.1f} s", file=sys.stderr)
        return chat, None
    except Exception as err:  # any failure is shown in the page instead of a dead server
        print(f"error: could not load GPT-2 {size}: {err}", file=sys.stderr)
        return None, (f"Could not load GPT-2 {size} into `{models_dir}`: {err}\n\nWithout internet, copy the "
                      f"seven files of the model into `{models_dir / size}` or set GPT2_BASE_URL to a folder "
                      "that holds them, then restart this app.")


CHAT, LOAD_ERROR = load_model()


def get_model_and_tokenizer() -> tuple:
    """The course's name for what this app serves: (tokenizer, model, model_config).
    The model is loaded once, at start-up; if that failed, this raises with the reason."""
    return course_names(CHAT, LOAD_ERROR)


# The course's module-level names, for code that imports them from this app (None without a model).
tokenizer, model, model_config = get_model_and_tokenizer() if CHAT else (None, None, None)
device = next(model.parameters()).device if CHAT else None


@cl.on_chat_start
async def on_chat_start() -> None:
    await start_chat(CHAT, LOAD_ERROR)


@cl.on_settings_update
async def on_settings_update(settings: dict) -> None:
    await update_settings(CHAT, settings)


@cl.on_message
async def main(message: cl.Message) -> None:  # the course's name for the handler
    await answer(CHAT, LOAD_ERROR, message)
