"""A tiny random BLIP image-text-matching model for tests and offline demos.

``python -m teacher_server make-tiny-model DIR`` writes, with no download, a
``BlipForImageTextRetrieval`` of the real architecture at toy sizes plus a ``BlipProcessor``
whose BERT-style WordPiece vocabulary this module builds itself: the special tokens, every
lowercase letter and digit as a word and as a ``##`` continuation (so any ASCII word tokenizes
without ``[UNK]``), and whole-word entries for the HOI verb and object words. The saved
directory loads through the same ``from_pretrained`` code as the real hub model.
"""

from __future__ import annotations

import argparse
import string
from pathlib import Path

# Words that HOI sentences are made of, as whole-word vocabulary entries. Anything else still
# tokenizes through the single-character pieces.
_HOI_WORDS = """
a an the person people and with on of in at to by
adjust assemble block blow board break brush buy carry catch chase check clean control cook cut
direct drag dribble drink drive dry eat exit feed fill flip flush fly greet grind groom herd hit
hold hop hose hug hunt inspect install jump kick kiss lasso launch lick lie lift light load lose
make milk move no interaction open operate pack paint park pay peel pet pick pour push race read
release repair ride row run sail scratch serve set shear sign sip sit slide smell spin squeeze
stab stand stick stir stop straddle swing tag talk teach text throw tie toast train turn type
walk wash watch wave wear wield zip look up down up phone computer instr obj smile point surf ski
skateboard snowboard laptop
airplane apple backpack banana baseball bat glove bear bed bench bicycle bird boat book bottle
bowl broccoli bus cake car carrot cat cell chair clock couch cow cup dining table dog donut
elephant fire hydrant fork frisbee giraffe hair drier handbag horse hot dog keyboard kite knife
motorcycle mouse orange oven parking meter pizza potted plant refrigerator remote sandwich
scissors sheep sink skis snowboard sports ball stop sign suitcase surfboard teddy tennis racket
tie toaster toilet toothbrush traffic light train truck tv umbrella vase wine glass zebra thing
something
"""

# BLIP-base: ViT-B/16 at 384 px and a 12-layer BERT-base text tower (what the benchmarks time).
BLIP_BASE_SHAPES = {
    "hidden_size": 768,
    "num_layers": 12,
    "num_heads": 12,
    "intermediate_size": 3072,
    "image_size": 384,
    "patch_size": 16,
    "projection_size": 256,
}

# A tiny BLIP that can *learn*: BERT's small initializer_range (the tests' default 0.2 spreads
# random scores but trains poorly) and 64 px images, enough to see the synthetic world's poses.
# Fine-tuned for about a minute on a CPU it ranks the synthetic verbs with ROC-AUC ~0.95
# (docs/teacher-quality.md); the demo and the distillation ablation teach it.
LEARNABLE_TINY_SHAPES = {
    "hidden_size": 64,
    "num_layers": 2,
    "num_heads": 4,
    "image_size": 64,
    "patch_size": 8,
    "initializer_range": 0.02,
}

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# BLIP's tokenizer is BERT's plus these two: [DEC] starts captions, [ENC] starts ITM text in the
# original BLIP.
BLIP_EXTRA_TOKENS = ("[DEC]", "[ENC]")


def build_vocabulary() -> dict[str, int]:
    """The tiny WordPiece vocabulary: token -> id, ``[PAD]`` = 0 as BERT."""
    tokens: list[str] = list(SPECIAL_TOKENS)
    pieces = string.ascii_lowercase + string.digits
    tokens += list(pieces) + [f"##{c}" for c in pieces] + list(string.punctuation)
    tokens += sorted(set(_HOI_WORDS.split()) - set(tokens))
    tokens += list(BLIP_EXTRA_TOKENS)
    return {token: index for index, token in enumerate(tokens)}


def make_tiny_model(
    directory: str | Path,
    *,
    seed: int = 0,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    intermediate_size: int | None = None,
    image_size: int = 32,
    patch_size: int = 8,
    projection_size: int = 16,
    initializer_range: float = 0.2,
) -> Path:
    """Write a random tiny ``BlipForImageTextRetrieval`` + ``BlipProcessor`` to ``directory``.

    The result is deterministic for a given ``seed`` and loads with
    ``ItmEngine.from_pretrained(directory)`` exactly like a hub model. The defaults are toy sizes;
    ``hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072, image_size=384,
    patch_size=16, projection_size=256`` is the BLIP-base architecture (the benchmarks use it).
    """
    import torch
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForImageTextRetrieval,
        BlipImageProcessor,
        BlipProcessor,
    )

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = build_vocabulary()
    intermediate_size = intermediate_size or 2 * hidden_size
    # transformers 5.x: BertTokenizer(vocab_file=...) silently ignores the file; pass vocab=.
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True, model_max_length=512)
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    if len(tokenizer) != len(vocab):
        raise RuntimeError(f"tiny tokenizer has {len(tokenizer)} tokens, expected {len(vocab)}")

    config = BlipConfig(
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": hidden_size,
            "intermediate_size": intermediate_size,
            "num_hidden_layers": num_layers,
            "num_attention_heads": num_heads,
            "max_position_embeddings": 128,
            "bos_token_id": vocab["[DEC]"],
            "pad_token_id": vocab["[PAD]"],
            "sep_token_id": vocab["[SEP]"],
            "initializer_range": initializer_range,
        },
        vision_config={
            "hidden_size": hidden_size,
            "intermediate_size": intermediate_size,
            "num_hidden_layers": num_layers,
            "num_attention_heads": num_heads,
            "image_size": image_size,
            "patch_size": patch_size,
            "initializer_range": initializer_range,
        },
        image_text_hidden_size=projection_size,
        # BERT's 0.02 makes a random model answer the same for every input; 0.2 spreads the
        # scores over (0, 1) without saturating, so tests can compare rankings.
        initializer_range=initializer_range,
    )
    torch.manual_seed(seed)
    model = BlipForImageTextRetrieval(config).eval()
    model.save_pretrained(directory)

    image_processor = BlipImageProcessor(
        size={"height": image_size, "width": image_size},
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(directory)
    return directory


def make_model_of_size(size: str, directory: str | Path, *, seed: int = 0) -> Path:
    """``tiny`` (the test model) or ``base`` (BLIP-base shapes), random weights, for benchmarks."""
    if size not in ("tiny", "base"):
        raise ValueError(f"size must be 'tiny' or 'base', not {size!r}")
    return make_tiny_model(directory, seed=seed, **(BLIP_BASE_SHAPES if size == "base" else {}))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``make-tiny-model``; the defaults make the test model."""
    parser.add_argument("directory", type=Path, help="where to write the model (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the weights (default 0)")
    parser.add_argument("--hidden-size", type=int, default=32, help="width of both towers (default 32)")
    parser.add_argument("--layers", type=int, default=2, help="layers per tower (default 2)")
    parser.add_argument(
        "--heads", type=int, default=2, help="attention heads per layer; must divide --hidden-size (default 2)"
    )
    parser.add_argument("--image-size", type=int, default=32, help="input resolution (default 32)")
    parser.add_argument("--patch-size", type=int, default=8, help="ViT patch size in pixels (default 8)")
    parser.add_argument(
        "--initializer-range",
        type=float,
        default=0.2,
        help="std of the random weights: 0.2 (default) spreads a random model's scores for tests; "
        "0.02 (BERT's) gives a model that fine-tuning can teach",
    )


def run(args: argparse.Namespace) -> int:
    """Write the model; exit code 2 with a message for sizes that do not fit together."""
    problem = _size_problem(args)
    if problem:
        print(f"make-tiny-model: {problem}")
        return 2
    path = make_tiny_model(
        args.directory,
        seed=args.seed,
        hidden_size=args.hidden_size,
        num_layers=args.layers,
        num_heads=args.heads,
        image_size=args.image_size,
        patch_size=args.patch_size,
        initializer_range=args.initializer_range,
    )
    print(f"wrote a tiny random BLIP ITM model to {path} (random weights: scores are meaningless)")
    return 0


def _size_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the sizes on the command line, or None."""
    for name in ("hidden_size", "layers", "heads", "image_size", "patch_size"):
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}"
    if args.hidden_size % args.heads:
        return f"--hidden-size {args.hidden_size} is not divisible by --heads {args.heads}"
    if args.patch_size > args.image_size:
        return f"--patch-size {args.patch_size} is larger than --image-size {args.image_size}"
    if not args.initializer_range > 0:
        return f"--initializer-range must be > 0, got {args.initializer_range}"
    return None
