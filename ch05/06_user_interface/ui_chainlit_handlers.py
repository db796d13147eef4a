"""The Chainlit side of both chat apps: the settings panel and the message handler.

`app_own.py` and `app_orig.py` differ only in which model they load; they register the
handlers of this module with Chainlit's decorators. The handlers keep per-session state
(the validated generation settings) in `cl.user_session`, which Chainlit keeps apart
for each browser tab.
"""

import string

import chainlit as cl
from chainlit.input_widget import NumberInput, Slider
from ui_chat_core import (
    ChatModel,
    GenerationSettings,
    SettingsError,
    default_settings,
    format_bound,
    prepare_prompt,
    reply_pieces,
    settings_ranges,
    stream_in_thread,
    validate_settings,
)

SETTINGS_KEY = "generation_settings"
EMPTY_MESSAGE_REPLY = "Your message is empty. Type some text and the model will continue it."
EMPTY_REPLY = "(The model ended the text right away: its first token was <|endoftext|>.)"


class MarkdownEscaper:
    """Makes model text display literally in Chainlit, which renders messages as Markdown.

    GPT-2 writes `*`, `_`, `#`, `1.` and indented lines like any other text, and Markdown
    would turn them into emphasis, headings, lists and code blocks. Every ASCII
    punctuation character gets a backslash (Markdown's escape), each newline becomes a
    hard line break, and spaces at the start of a line become no-break spaces (four
    spaces would start a code block). It works piece by piece, so streamed pieces can be
    escaped as they come: it remembers whether the last piece ended a line.
    """

    def __init__(self):
        self.at_line_start = True

    def escape(self, text: str) -> str:
        out = []
        for char in text:
            if char == "\n":
                out.append("  \n")
                self.at_line_start = True
                continue
            if char in " \t" and self.at_line_start:
                out.append("\u00a0" * (4 if char == "\t" else 1))
                continue
            self.at_line_start = False
            out.append("\\" + char if char in string.punctuation else char)
        return "".join(out)


def settings_panel(chat: ChatModel, current: GenerationSettings) -> cl.ChatSettings:
    """The settings panel of the page, showing `current` and each setting's range."""
    ranges = settings_ranges(chat.context_length, chat.vocab_size)

    def span(name: str) -> str:
        low, high = ranges[name]
        return f"{format_bound(low)} to {format_bound(high)}"

    return cl.ChatSettings([
        Slider(id="temperature", label="Temperature", initial=current.temperature, min=ranges["temperature"][0],
               max=ranges["temperature"][1], step=0.05,
               description="0: always the most likely next token (greedy). Higher: more varied, less coherent."),
        NumberInput(id="top_k", label=f"Top-k ({span('top_k')})", initial=current.top_k,
                    description="Sample only among the k most likely tokens. 0 switches it off."),
        Slider(id="top_p", label="Top-p (nucleus)", initial=current.top_p, min=ranges["top_p"][0],
               max=ranges["top_p"][1], step=0.01,
               description="Sample only among the most likely tokens that together have probability p. "
                           "1 switches it off."),
        NumberInput(id="max_new_tokens", label=f"Max new tokens ({span('max_new_tokens')})",
                    initial=current.max_new_tokens,
                    description="Length limit of a reply. At most half the context window, so the prompt "
                                "keeps the other half."),
        NumberInput(id="seed", label=f"Seed ({span('seed')})", initial=current.seed,
                    description="-1: a new random seed for each reply. Any other value: the same prompt "
                                "gives the same reply."),
    ])


async def start_chat(chat: ChatModel | None, load_error: str | None) -> None:
    """New session: show the settings panel with the defaults, or why there is no model."""
    if chat is None:
        await cl.Message(content=load_error or "No model is loaded.", author="Error").send()
        return
    settings = default_settings(chat.context_length)
    cl.user_session.set(SETTINGS_KEY, settings)
    await settings_panel(chat, settings).send()
    await cl.Message(content=(
        f"Chatting with **{chat.name}** (context window: {chat.context_length} tokens). "
        "It is a base model, not an assistant: it continues whatever text you send. "
        "Change temperature, top-k, top-p, reply length and seed in the settings panel."
    )).send()


async def update_settings(chat: ChatModel | None, raw: dict) -> None:
    """Apply the panel's new values if they are all valid; otherwise keep the old ones and say why."""
    if chat is None:
        return
    current = cl.user_session.get(SETTINGS_KEY) or default_settings(chat.context_length)
    try:
        settings = validate_settings(raw, chat.context_length, chat.vocab_size, base=current)
    except SettingsError as err:
        await cl.Message(content=f"Settings not changed: {err} The previous settings stay in effect.",
                         author="Settings").send()
        await settings_panel(chat, current).send()  # put the panel back to the values in effect
        return
    cl.user_session.set(SETTINGS_KEY, settings)
    await cl.Message(content=f"Settings applied: {describe(settings)}.", author="Settings").send()


def describe(settings: GenerationSettings) -> str:
    return (f"temperature {settings.temperature:g}, top-k {settings.top_k}, top-p {settings.top_p:g}, "
            f"max new tokens {settings.max_new_tokens}, seed {settings.seed}")


async def answer(chat: ChatModel | None, load_error: str | None, message: cl.Message) -> str:
    """Stream the model's continuation of `message` into a new message; returns the reply text."""
    if chat is None:
        await cl.Message(content=load_error or "No model is loaded.", author="Error").send()
        return ""
    if not message.content.strip():
        await cl.Message(content=EMPTY_MESSAGE_REPLY).send()
        return ""
    settings = cl.user_session.get(SETTINGS_KEY) or default_settings(chat.context_length)
    prompt_ids, notice = prepare_prompt(message.content, chat.tokenizer, chat.context_length,
                                        settings.max_new_tokens)
    if notice:
        await cl.Message(content=notice, author="Notice").send()

    reply, escaper = cl.Message(content=""), MarkdownEscaper()
    pieces = []
    async for piece in stream_in_thread(lambda should_stop: reply_pieces(chat, prompt_ids, settings, should_stop)):
        pieces.append(piece)
        await reply.stream_token(escaper.escape(piece))
    if not pieces:
        reply.content = EMPTY_REPLY
    await reply.send()
    return "".join(pieces)
