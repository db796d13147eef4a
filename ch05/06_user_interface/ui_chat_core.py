"""What the two chat apps share, without any Chainlit: settings, prompts, streaming.

The apps (`app_own.py`, `app_orig.py`) are thin Chainlit wrappers around this module,
so everything here can be tested with a tiny model and no web server.

- `GenerationSettings` / `validate_settings`: the per-session chat settings and their ranges.
- `prepare_prompt`: tokenize, and cut long prompts from the left so the reply still fits.
- `reply_pieces`: generate with the KV cache and turn tokens into text pieces as they come.
  Replies of all sessions go through one `ui_batching.Batcher`, so sessions that generate
  at the same time share forward passes; `reply_text` generates alone, which is what
  every batched reply must equal.
- `stream_in_thread`: run that generator in a worker thread and hand the pieces to asyncio,
  so a reply being generated never blocks the web server's event loop (other users).
"""

import asyncio
import codecs
import os
import secrets
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import tiktoken
import torch
from ch05_utils import config_from_state_dict, get_device, load_state_dict_checked, read_model_state_dict
from gpt_kv_cache import GPTModelKV, compile_enabled, generate_stream
from previous_chapters import get_tokenizer
from ui_batching import Batcher, Request

END_OF_TEXT = "<|endoftext|>"
MAX_NEW_TOKENS_LIMIT = 1000  # the upper end of the setting, for models with long contexts


INT8_ENV = "CH05_INT8"  # "1": the apps decode with int8 weights
MAX_BATCH_ENV = "CH05_MAX_BATCH"  # sessions generated together (more wait for a free row)


@dataclass
class ChatModel:
    """A model ready to chat: in eval mode, with its tokenizer, a name for the page and
    the batcher that generates every session's replies (int8 weights if `int8`)."""
    model: GPTModelKV
    tokenizer: tiktoken.Encoding
    name: str
    int8: bool = False
    batcher: Batcher | None = None

    @property
    def context_length(self) -> int:
        return self.model.context_length

    @property
    def vocab_size(self) -> int:
        return self.model.tok_emb.num_embeddings


def make_chat_model(model: GPTModelKV, name: str, *, int8: bool = False, max_batch: int = 8) -> ChatModel:
    """Wrap `model` for chatting. It is switched to eval mode here, once, for good:
    dropout must be off when generating, and the KV-cache path refuses training mode.
    Raises ValueError if `int8` is asked for a model that cannot be quantized."""
    model.eval()
    chat = ChatModel(model, get_tokenizer(), name + (" (int8 weights)" if int8 else ""), int8)
    ctx, vocab = chat.context_length, chat.vocab_size

    def check_settings(request: Request) -> None:
        validate_settings({"temperature": request.temperature, "top_k": request.top_k or 0, "top_p": request.top_p,
                           "max_new_tokens": request.max_new_tokens, "seed": request.seed}, ctx, vocab)

    chat.batcher = Batcher(model, max_batch=max_batch, int8=int8, check_settings=check_settings)
    return chat


def int8_requested() -> bool:
    """The apps' int8 setting: CH05_INT8=1 (anything else but 0 or empty is refused)."""
    value = os.environ.get(INT8_ENV, "").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"{INT8_ENV} must be 1 (int8 weights) or 0 (float32), got {value!r}")
    return value == "1"


def max_batch_requested() -> int:
    """The apps' CH05_MAX_BATCH setting: how many sessions generate together (default 8)."""
    value = os.environ.get(MAX_BATCH_ENV, "").strip() or "8"
    if not value.isdigit() or not 1 <= int(value) <= 256:
        raise ValueError(f"{MAX_BATCH_ENV} must be a whole number from 1 to 256, got {value!r}")
    return int(value)


def warm_up(chat: ChatModel) -> None:
    """Compile the decoding step now (when torch.compile is on), so that the first
    reader does not wait for it: a two-token reply through the batcher."""
    if compile_enabled():
        chat.batcher.generate([chat.tokenizer.eot_token], 2)


def load_model_file(path: str | Path) -> GPTModelKV:
    """The model of a gpt_train.py `checkpoint.pth`, or of the book's `model.pth` /
    `model_and_optimizer.pth`, in eval mode; only the model's tensors are read from the file."""
    state_dict, config = read_model_state_dict(path)  # memory-mapped: an optimizer state is never read
    # Built without random initialization (seconds for 124M): every weight is then
    # overwritten from the file. Only the causal masks, which older files lack, are
    # filled here, since `to_empty` leaves the memory as it found it.
    with torch.device("meta"):
        model = GPTModelKV(config or config_from_state_dict(state_dict))
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for block in model.trf_blocks:
            block.att.mask.copy_(torch.triu(torch.ones_like(block.att.mask), diagonal=1))
    load_state_dict_checked(model, state_dict, path)
    return model.eval()


def load_own_checkpoint(path: str | Path, device: str = "auto", *, int8: bool = False,
                        max_batch: int = 8) -> ChatModel:
    """`load_model_file`, ready to chat."""
    model = load_model_file(path)
    return make_chat_model(model.to(get_device(device)), f"your model ({Path(path).name})", int8=int8,
                           max_batch=max_batch)



def course_names(chat: ChatModel | None, load_error: str | None) -> tuple[tiktoken.Encoding, GPTModelKV, dict]:
    """What the course's `get_model_and_tokenizer()` returns: (tokenizer, model, model_config).

    Raises RuntimeError with the message the page shows if the app has no model."""
    if chat is None:
        raise RuntimeError(load_error)
    config = config_from_state_dict(chat.model.state_dict(), n_heads=chat.model.trf_blocks[0].att.num_heads)
    return chat.tokenizer, chat.model, config

#####################################
# Settings
#####################################

@dataclass(frozen=True)
class GenerationSettings:
    """How a reply is generated. temperature 0 means greedy (top-k/top-p then do nothing);
    top_k 0 and top_p 1.0 switch those filters off; seed -1 draws a new random seed for
    each reply, any other seed makes the same prompt give the same reply."""
    temperature: float = 0.7
    top_k: int = 50
    top_p: float = 0.95
    max_new_tokens: int = 50
    seed: int = -1


class SettingsError(ValueError):
    """Settings outside their ranges; the message lists every problem."""


def max_new_tokens_limit(context_length: int) -> int:
    """At most half the context window may go to the reply, so the prompt keeps the other half."""
    return max(1, min(MAX_NEW_TOKENS_LIMIT, context_length // 2))


def settings_ranges(context_length: int, vocab_size: int) -> dict[str, tuple[float, float]]:
    """The allowed (min, max) of each setting for a model (both ends included)."""
    return {
        "temperature": (0.0, 2.0),
        "top_k": (0, vocab_size),
        "top_p": (0.01, 1.0),
        "max_new_tokens": (1, max_new_tokens_limit(context_length)),
        "seed": (-1, 2**31 - 1),
    }


def format_bound(value: float) -> str:
    """2 rather than 2.0 for floats, and all the digits of integers (2147483647, not 2.14748e+09)."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def default_settings(context_length: int) -> GenerationSettings:
    limit = max_new_tokens_limit(context_length)
    return GenerationSettings(max_new_tokens=min(GenerationSettings.max_new_tokens, limit))


def validate_settings(raw: dict, context_length: int, vocab_size: int,
                      base: GenerationSettings | None = None) -> GenerationSettings:
    """Check raw values (from the settings panel: numbers, maybe strings) against their ranges.

    Missing keys keep `base`'s value; unknown keys are ignored. Integer settings must be
    whole numbers (5.0 is fine, 5.5 is not). Raises SettingsError naming every bad value.
    """
    base = base or default_settings(context_length)
    ranges = settings_ranges(context_length, vocab_size)
    values, problems = asdict(base), []
    for name, (low, high) in ranges.items():
        if raw.get(name) is None or raw.get(name) == "":
            continue
        is_int = isinstance(values[name], int)
        try:
            number = float(raw[name])
        except (TypeError, ValueError):
            problems.append(f"{name} must be a number, got {raw[name]!r}")
            continue
        if is_int and not number.is_integer():
            problems.append(f"{name} must be a whole number, got {raw[name]!r}")
        elif not low <= number <= high:
            problems.append(f"{name} must be between {format_bound(low)} and {format_bound(high)}, got {number:g}")
        else:
            values[name] = int(number) if is_int else number
    if problems:
        raise SettingsError("; ".join(problems) + ".")
    return GenerationSettings(**values)


#####################################
# Prompt and reply
#####################################

def prepare_prompt(text: str, tokenizer: tiktoken.Encoding, context_length: int,
                   max_new_tokens: int) -> tuple[list[int], str | None]:
    """Token ids of `text`, and a notice if it had to be shortened.

    The model sees at most `context_length` tokens, and the reply's tokens need room in
    that window too, so a prompt keeps at most `context_length - max_new_tokens` tokens:
    the LAST ones, since the reply continues the end of the text. Text that merely looks
    like the special token <|endoftext|> is encoded as ordinary characters.
    """
    if not text.strip():
        raise ValueError("The message is empty: type some text for the model to continue.")
    ids = tokenizer.encode(text, disallowed_special=())
    budget = context_length - max_new_tokens
    if budget < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for the prompt in the "
                         f"context window of {context_length} tokens.")
    if len(ids) <= budget:
        return ids, None
    notice = (f"Your prompt has {len(ids)} tokens, but this model reads at most {context_length} and "
              f"{max_new_tokens} are kept for the reply, so only its last {budget} tokens were used.")
    return ids[-budget:], notice


class TextStream:
    """Turns token ids into text pieces as they arrive.

    GPT-2's tokens are byte sequences, and a character such as an emoji can be split
    over two tokens. An incremental UTF-8 decoder holds back incomplete characters until
    their last byte arrives, so the pieces joined are exactly `tokenizer.decode(ids)`.
    """

    def __init__(self, tokenizer: tiktoken.Encoding):
        self.tokenizer = tokenizer
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self.decoder.decode(self.tokenizer.decode_single_token_bytes(token_id))

    def flush(self) -> str:
        return self.decoder.decode(b"", final=True)


def reply_token_ids(chat: ChatModel, prompt_ids: list[int], settings: GenerationSettings,
                    should_stop: Callable[[], bool] = lambda: False) -> Iterator[int]:
    """The reply's token ids as the batcher generates them (the end-of-text token is not
    yielded). Once `should_stop()` is true the request leaves the batch."""
    request = chat.batcher.submit(prompt_ids, settings.max_new_tokens, temperature=settings.temperature,
                                  top_k=settings.top_k, top_p=settings.top_p, seed=settings.seed,
                                  eos_id=chat.tokenizer.eot_token)
    yield from request.stream(should_stop)


def alone_token_ids(chat: ChatModel, prompt_ids: list[int], settings: GenerationSettings) -> list[int]:
    """The reply generated alone, without the batcher (`generate_stream`): what a
    batched reply with the same seed must equal."""
    seed = settings.seed if settings.seed >= 0 else secrets.randbelow(2**31)
    generator = torch.Generator(device=chat.model.tok_emb.weight.device).manual_seed(seed)
    return list(generate_stream(chat.model, prompt_ids, settings.max_new_tokens, temperature=settings.temperature,
                                top_k=settings.top_k or None, top_p=settings.top_p, eos_id=chat.tokenizer.eot_token,
                                generator=generator, int8=chat.int8))


def reply_pieces(chat: ChatModel, prompt_ids: list[int], settings: GenerationSettings,
                 should_stop: Callable[[], bool] = lambda: False) -> Iterator[str]:
    """The reply as text pieces, one per token (empty pieces are skipped)."""
    stream = TextStream(chat.tokenizer)
    for token_id in reply_token_ids(chat, prompt_ids, settings, should_stop):
        if piece := stream.push(token_id):
            yield piece
    if rest := stream.flush():
        yield rest


def reply_text(chat: ChatModel, prompt_ids: list[int], settings: GenerationSettings) -> str:
    """The whole reply, generated alone and decoded in one go: what the streamed pieces
    of a batched reply with the same seed must add up to."""
    return chat.tokenizer.decode(alone_token_ids(chat, prompt_ids, settings))


async def stream_in_thread(make_pieces: Callable[[Callable[[], bool]], Iterator[str]]) -> AsyncIterator[str]:
    """Run a blocking generator in a worker thread and yield its items here, as they come.

    `make_pieces(should_stop)` builds the generator; `should_stop()` turns true when the
    consumer goes away (the user pressed stop, or the session ended), so the thread stops
    generating at the next token instead of finishing a reply nobody reads. The event
    loop only ever waits on a queue, so other sessions are served meanwhile.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    stop = threading.Event()
    done = object()

    def put(item) -> None:
        if not loop.is_closed():  # the server may be shutting down
            loop.call_soon_threadsafe(queue.put_nowait, item)

    def work() -> None:
        try:
            for piece in make_pieces(stop.is_set):
                put(piece)
        except Exception as err:  # hand the error to the event loop, which re-raises it
            put(err)
        finally:
            put(done)

    thread = threading.Thread(target=work, name="generate", daemon=True)
    thread.start()
    try:
        while (item := await queue.get()) is not done:
            if isinstance(item, Exception):
                raise item
            yield item
    finally:
        stop.set()
