"""Generate text with OpenAI's GPT-2 weights or with your own model from gpt_train.py.

    python gpt_generate.py --prompt "Every effort moves you"            # GPT-2 124M, downloaded once
    python gpt_generate.py --model-size 355M --temperature 0.8 --top-k 40
    python gpt_generate.py --checkpoint output/checkpoint.pth           # your own weights

The text is printed as it is generated, one token at a time. --temperature 0 decodes
greedily (the same text every time); above 0 it samples, reproducibly for a given --seed.
"""

import argparse
import codecs
import sys
from pathlib import Path

import torch
from ch05_utils import generate, get_device, load_checkpoint
from gpt_download import MODEL_SIZES, config_from_hparams, download_and_load_gpt2, load_weights_into_gpt
from previous_chapters import GPTModel, get_tokenizer

END_OF_TEXT = "<|endoftext|>"


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
                        help="Use your own model: a checkpoint.pth written by gpt_train.py, instead of GPT-2.")
    parser.add_argument("--max-new-tokens", type=int, default=50, help="Stop after this many tokens.")
    parser.add_argument("--temperature", type=float, default=1.0, help="0 for greedy decoding.")
    parser.add_argument("--top-k", type=int, default=50, help="Sample only among the k most likely tokens; 0: all.")
    parser.add_argument("--seed", type=int, default=123, help="Seed of the sampling (same seed, same text).")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps.")
    return parser


def check_args(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}.")
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {args.temperature}.")
    if args.top_k < 0:
        raise ValueError(f"--top-k must be >= 0 (0 keeps every token), got {args.top_k}.")


def load_model(args: argparse.Namespace) -> tuple[GPTModel, str]:
    """Either GPT-2 with OpenAI's weights or the model of a gpt_train.py checkpoint."""
    if args.checkpoint is not None:
        checkpoint = load_checkpoint(args.checkpoint)
        model = GPTModel(checkpoint["config"])
        model.load_state_dict(checkpoint["model"])
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        device = get_device(args.device)
        model, name = load_model(args)
    except (ValueError, FileNotFoundError, ConnectionError, ImportError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    model.to(device).eval()
    tokenizer = get_tokenizer()
    eos_id = tokenizer.eot_token
    prompt_ids = tokenizer.encode(args.prompt, allowed_special={END_OF_TEXT}) or [eos_id]
    if len(prompt_ids) > model.pos_emb.weight.shape[0]:
        print(f"note: the prompt has {len(prompt_ids)} tokens; only the last {model.pos_emb.weight.shape[0]} "
              "fit the model's context.", file=sys.stderr)
    print(f"[{name} on {device}]", file=sys.stderr)

    print(args.prompt, end="", flush=True)
    token_ids = torch.tensor([prompt_ids], device=device)
    for piece in text_pieces(stream_tokens(model, token_ids, args, eos_id), tokenizer):
        print(piece, end="", flush=True)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
