"""Chat in the browser with the model you trained in chapter 5 (`gpt_train.py`).

    chainlit run app_own.py                    # then open http://127.0.0.1:8000
    CH05_CHECKPOINT=path/to/checkpoint.pth chainlit run app_own.py

The checkpoint defaults to the one `gpt_train.py` writes when run in
../01_main-chapter-code (output/checkpoint.pth). The model's shape is read from the
checkpoint. Set CH05_DEVICE to cpu, cuda or mps to choose the device (default: auto).
"""

import os
import sys
from pathlib import Path

import chainlit as cl
from ui_chainlit_handlers import answer, start_chat, update_settings
from ui_chat_core import ChatModel, load_own_checkpoint

CHECKPOINT_ENV = "CH05_CHECKPOINT"
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "01_main-chapter-code" / "output" / "checkpoint.pth"


def load_model() -> tuple[ChatModel | None, str | None]:
    """The model, or None and a message for the page that says how to get one."""
    path = Path(os.environ.get(CHECKPOINT_ENV) or DEFAULT_CHECKPOINT)
    if not path.is_file():
        return None, (
            f"No checkpoint at `{path}`. Train a model first, for example (a few seconds):\n\n"
            "`cd ch05/01_main-chapter-code && python gpt_train.py --model tiny --num-epochs 1`\n\n"
            f"(the chapter's run is plain `python gpt_train.py`), or set {CHECKPOINT_ENV} to the path of a "
            "`checkpoint.pth` written by gpt_train.py, then restart this app."
        )
    try:
        return load_own_checkpoint(path, device=os.environ.get("CH05_DEVICE", "auto")), None
    except Exception as err:  # any failure is shown in the page instead of a dead server
        print(f"error: could not load {path}: {err}", file=sys.stderr)
        return None, f"Could not load `{path}`: {err}. Is it a checkpoint written by gpt_train.py?"


CHAT, LOAD_ERROR = load_model()


@cl.on_chat_start
async def on_chat_start() -> None:
    await start_chat(CHAT, LOAD_ERROR)


@cl.on_settings_update
async def on_settings_update(settings: dict) -> None:
    await update_settings(CHAT, settings)


@cl.on_message
async def on_message(message: cl.Message) -> None:
    await answer(CHAT, LOAD_ERROR, message)
