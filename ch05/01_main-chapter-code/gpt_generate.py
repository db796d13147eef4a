"""Generate text with OpenAI's GPT-2 weights or with your own model from gpt_train.py.

From Python, the book's way:

    from gpt_generate import main
    main(BASE_CONFIG, "Every effort moves you", "124M", torch.device("cpu"))

From the command line (streaming the text as it is generated):

    python gpt_generate.py --prompt "Every effort moves you"            # GPT-2 124M, downloaded once
    python gpt_generate.py --model-size 355M --temperature 0.8 --top-k 40
    python gpt_generate.py --checkpoint output/checkpoint.pth           # your own weights (or the book's model.pth)

The text is printed as it is generated, one token at a time. --temperature 0 decodes
greedily (the same text every time); above 0 it samples, reproducibly for a given --seed.
Generation uses a KV cache (gpt_kv_cache.py): each new token costs one step over one
position, and the tokens are exactly those of the chapter's `generate`, which
--no-kv-cache runs instead (a full forward pass per token). --int8 decodes with int8
weights (faster, slightly different numbers); --compile compiles the decoding step
(--int8 always does), which pays off from a few hundred tokens on.
"""

import argparse
import codecs
import math
import sys
from pathlib import Path

import torch

from ch05_utils import get_device, load_gpt_model
from gpt_kv_cache import compile_enabled, generate_stream, inference_weights
from gpt_download import (  # noqa: F401  (the book's gpt_generate.py defines these names)
    MODEL_SIZES,
    config_from_hparams,
    download_and_load_gpt2,
    download_file,
    load_gpt2_params_from_tf_ckpt,
)
from previous_chapters import (  # noqa: F401
    GPTModel,
    assign,
    generate,
    get_tokenizer,
    load_weights_into_gpt,
    text_to_token_ids,
    token_ids_to_text,
)

END_OF_TEXT = "<|endoftext|>"


def main(gpt_config: dict, input_prompt: str, model_size: str, device: torch.device) -> None:
    """The book's `main`: load OpenAI's GPT-2 `model_size` (downloaded into ./gpt2 once)
    into a GPTModel built from `gpt_config` and print 25 sampled tokens (top-k 50,
    temperature 1.0, seed 123) that continue `input_prompt`."""
    settings, params = download_and_load_gpt2(model_size=model_size, models_dir="gpt2")
    gpt = GPTModel(gpt_config)
    load_weights_into_gpt(gpt, params)
    gpt.to(device)
    gpt.eval()
    tokenizer = get_tokenizer()
    torch.manual_seed(123)
    token_ids = generate(model=gpt, idx=text_to_token_ids(input_prompt, tokenizer).to(device), max_new_tokens=25,
                         context_size=gpt_config["context_length"], top_k=50, temperature=1.0)
    print("Output text:\n", token_ids_to_text(token_ids, tokenizer))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Generate text with GPT-2 (OpenAI's weights) or a gpt_train.py checkpoint.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--prompt", default="Every effort moves you",
                        help="Text to continue. An empty prompt starts a new document.")
    parser.add_argument("--model-size", choices=MODEL_SIZES, default="124M", help="Which GPT-2 to download.")
    parser.add_argument("--models-dir", type=Path, default=Path("gpt2"),
                        help="Where GPT-2's files are kept (downloaded on first use).")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="Use your own model instead of GPT-2: a checkpoint.pth written by gpt_train.py, or "
                             "the book's model.pth / model_and_optimizer.pth.")
    parser.add_argument("--n-heads", type=int, default=None,
                        help="Attention heads of a --checkpoint model that holds no config (the book's model.pth) "
                             "and is not GPT-2 sized.")
    parser.add_argument("--max-new-tokens", type=int, default=50, help="Stop after this many tokens.")
    parser.add_argument("--temperature", type=float, default=1.0, help="0 for greedy decoding.")
    parser.add_argument("--top-k", type=int, default=50, help="Sample only among the k most likely tokens; 0: all.")
    parser.add_argument("--seed", type=int, default=123, help="Seed of the sampling (same seed, same text).")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps.")
    parser.add_argument("--no-kv-cache", action="store_true",
                        help="Generate with the chapter's generate (a full forward pass per token), as in the book.")
    parser.add_argument("--int8", action="store_true",
                        help="Decode with int8 weights (one scale per output channel): faster, slightly different "
                             "numbers. Compiles the decoding step.")
    parser.add_argument("--compile", action="store_true",
                        help="Compile the decoding step with torch.compile (takes a while the first time).")
    return parser


def check_args(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}.")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise ValueError(f"--temperature must be a number >= 0 (0: greedy), got {args.temperature}.")
    if args.n_heads is not None and args.n_heads < 1:
        raise ValueError(f"--n-heads must be at least 1, got {args.n_heads}.")
    if args.top_k < 0:
        raise ValueError(f"--top-k must be >= 0 (0 keeps every token), got {args.top_k}.")
    if args.no_kv_cache and (args.int8 or args.compile):
        raise ValueError("--int8 and --compile work on the KV-cache path: leave out --no-kv-cache.")


def load_model(args: argparse.Namespace) -> tuple[GPTModel, str]:
    """Either GPT-2 with OpenAI's weights or the model of a gpt_train.py checkpoint."""
    if args.checkpoint is not None:
        model, _ = load_gpt_model(args.checkpoint, n_heads=args.n_heads)  # reads the weights only, not the optimizer
        return model, str(args.checkpoint)
    settings, params = download_and_load_gpt2(args.model_size, args.models_dir)
    model = GPTModel(config_from_hparams(settings))
    load_weights_into_gpt(model, params)
    return model, f"GPT-2 {args.model_size}"


def stream_tokens(model: GPTModel, token_ids: torch.Tensor, args: argparse.Namespace, eos_id: int):
    """Yield new token ids one at a time until --max-new-tokens or <|endoftext|>.

    Each step is one call of the chapter's `generate` for a single token, with the same
    random generator throughout, so the tokens are exactly those one `generate` call for
    all of them would give.
    """
    device = token_ids.device
    generator = torch.Generator(device=device).manual_seed(args.seed)
    context_size = model.pos_emb.weight.shape[0]
    for _ in range(args.max_new_tokens):
        token_ids = generate(model, token_ids, max_new_tokens=1, context_size=context_size,
                             temperature=args.temperature, top_k=args.top_k or None, generator=generator)
        next_id = token_ids[0, -1].item()
        if next_id == eos_id:
            return
        yield next_id


def stream_tokens_kv(model: GPTModel, token_ids: torch.Tensor, args: argparse.Namespace, eos_id: int):
    """`stream_tokens` with the KV cache: the same tokens from the same seed, one step
    over one position per token (`gpt_kv_cache.generate_stream`)."""
    generator = torch.Generator(device=token_ids.device).manual_seed(args.seed)
    yield from generate_stream(model, token_ids[0].tolist(), args.max_new_tokens, temperature=args.temperature,
                               top_k=args.top_k or None, eos_id=eos_id, generator=generator, int8=args.int8,
                               use_compile=(args.compile or args.int8) and compile_enabled())


def text_pieces(token_ids, tokenizer):
    """Yield the text of each token as soon as it is complete.

    Tokens are pieces of UTF-8 bytes, and one character (an emoji, say) may be split
    across two tokens; an incremental decoder holds such bytes back until the character
    is complete, instead of printing a replacement character.
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for token_id in token_ids:
        yield decoder.decode(tokenizer.decode_single_token_bytes(token_id))
    yield decoder.decode(b"", final=True)


def cli(argv: list[str] | None = None) -> int:
    """The command line: `python gpt_generate.py --help`."""
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        device = get_device(args.device)
        model, name = load_model(args)
    except (ValueError, FileNotFoundError, ConnectionError, ImportError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    model.to(device).eval()
    if args.int8:
        try:
            inference_weights(model, int8=True)  # quantize now: a model int8 cannot serve is refused here
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    tokenizer = get_tokenizer()
    eos_id = tokenizer.eot_token
    prompt_ids = tokenizer.encode(args.prompt, allowed_special={END_OF_TEXT}) or [eos_id]
    if len(prompt_ids) > model.pos_emb.weight.shape[0]:
        print(f"note: the prompt has {len(prompt_ids)} tokens; only the last {model.pos_emb.weight.shape[0]} "
              "fit the model's context.", file=sys.stderr)
    path = "the chapter's generate" if args.no_kv_cache else "KV cache" + (", int8 weights" if args.int8 else "")
    print(f"[{name} on {device}, {path}]", file=sys.stderr)

    print(args.prompt, end="", flush=True)
    token_ids = torch.tensor([prompt_ids], device=device)
    stream = stream_tokens if args.no_kv_cache else stream_tokens_kv
    for piece in text_pieces(stream(model, token_ids, args, eos_id), tokenizer):
        print(piece, end="", flush=True)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(cli())
