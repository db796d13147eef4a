"""Chat in the browser with the model you trained in chapter 5 (`gpt_train.py` or the book's code).

    chainlit run app_own.py                    # then open http://127.0.0.1:8000
    CH05_CHECKPOINT=path/to/checkpoint.pth chainlit run app_own.py
    CH05_INT8=1 chainlit run app_own.py        # int8 weights: faster replies, a little less exact
    CH05_MAX_BATCH=4 chainlit run app_own.py   # at most 4 sessions generate together (default 8)

Without CH05_CHECKPOINT the app takes the first file that exists of
../01_main-chapter-code/output/checkpoint.pth (written by `gpt_train.py`) and the book's
../01_main-chapter-code/model.pth and model_and_optimizer.pth (saved by the chapter's
notebook). Only the model's tensors are read: an optimizer state stored beside them stays
on disk. The model's shape is read from the file. Set CH05_DEVICE to cpu, cuda or mps to
choose the device (default: auto).
"""

import os
import sys
import time
from pathlib import Path

import chainlit as cl
from ui_chainlit_handlers import answer, start_chat, update_settings
from ui_chat_core import ChatModel, course_names, int8_requested, load_own_checkpoint, max_batch_requested, warm_up

CHECKPOINT_ENV = "CH05_CHECKPOINT"
CHAPTER_DIR = Path(__file__).resolve().parent.parent / "01_main-chapter-code"
# Ours first, then the files the book's notebook saves.
DEFAULT_CHECKPOINTS = (CHAPTER_DIR / "output" / "checkpoint.pth", CHAPTER_DIR / "model.pth",
                       CHAPTER_DIR / "model_and_optimizer.pth")


def find_checkpoint() -> Path:
    """CH05_CHECKPOINT if set, else the first default file that exists (else the first default)."""
    if os.environ.get(CHECKPOINT_ENV):
        return Path(os.environ[CHECKPOINT_ENV])
    return next((path for path in DEFAULT_CHECKPOINTS if path.is_file()), DEFAULT_CHECKPOINTS[0])


def load_model() -> tuple[ChatModel | None, str | None]:
    """The model, or None and a message for the page that says how to get one."""
    path = find_checkpoint()
    if not path.is_file():
        return None, (
            f"No checkpoint at `{path}`. Train a model first, for example (a few seconds):\n\n"
            "`cd ch05/01_main-chapter-code && python gpt_train.py --model tiny --num-epochs 1`\n\n"
            f"(the chapter's run is plain `python gpt_train.py`), or set {CHECKPOINT_ENV} to the path of a "
            "`checkpoint.pth` written by gpt_train.py or a `model.pth` saved by the book's code, then restart "
            "this app."
        )
    try:
        start = time.perf_counter()
        chat = load_own_checkpoint(path, device=os.environ.get("CH05_DEVICE", "auto"), int8=int8_requested(),
                                   max_batch=max_batch_requested())
        loaded = time.perf_counter()
        warm_up(chat)
        print(f"loaded {path} in {loaded - start:.1f} s, decoding step ready after {time.perf_counter() - start:.1f} s",
              file=sys.stderr)
        return chat, None
    except Exception as err:  # any failure is shown in the page instead of a dead server
        print(f"error: could not load {path}: {err}", file=sys.stderr)
        return None, (f"Could not load `{path}`: {err} It should be a checkpoint written by gpt_train.py or a "
                      "model.pth saved by the book's code.")


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
