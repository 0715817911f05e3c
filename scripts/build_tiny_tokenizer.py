"""Train the byte-level BPE tokenizer of `builtin:tiny` from the bundled corpus.

Run offline; the output (`disaggctl/data/tiny-tokenizer.json`) is committed, so that the tokenizer
never depends on the training environment. Two runs on the same corpus give identical bytes.

    python scripts/build_tiny_tokenizer.py [--vocab-size 1024] [--out PATH]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "disaggctl" / "data"
# ChatML needs these three; ids 0-2 so that every model built on this tokenizer agrees on them.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build(corpus: str, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Paragraphs as training units: merges never span a blank line.
    tok.train_from_iterator([p for p in corpus.split("\n\n") if p.strip()], trainer=trainer)
    for i, name in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(name) != i:
            raise SystemExit(f"special token {name} got id {tok.token_to_id(name)}, expected {i}")
    return tok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, default=DATA / "tiny-corpus.txt")
    ap.add_argument("--vocab-size", type=int, default=1024)
    ap.add_argument("--out", type=Path, default=DATA / "tiny-tokenizer.json")
    args = ap.parse_args(argv)
    tok = build(args.corpus.read_text(encoding="utf-8"), args.vocab_size)
    args.out.write_text(tok.to_str(pretty=True) + "\n", encoding="utf-8")
    print(f"wrote {args.out} (vocab {tok.get_vocab_size()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
