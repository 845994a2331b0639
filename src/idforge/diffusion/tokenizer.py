"""A real ``CLIPTokenizer`` built offline from a small vocabulary we write ourselves.

No tokenizer ships in a registry package, so the tiny test models get one trained here: byte-level BPE in CLIP's
layout (256 byte symbols, the same 256 with the end-of-word suffix ``</w>``, then one entry per merge, then the two
special tokens). Merges are learned greedily from :data:`WORDS` until every listed word is a single token, so prompt
words map to one id each; any other ASCII word still round-trips through its single-character symbols.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
EOW = "</w>"
MODEL_MAX_LENGTH = 77

# Words the prompt sets, class nouns, captions and identity anchors use. Lower-case: CLIP's normaliser lowercases.
CLASS_NOUNS = ("man", "woman", "person", "boy", "girl")
CELEBRITY_NAMES = (
    "emma", "watson", "tom", "hanks", "taylor", "swift", "barack", "obama", "scarlett", "johansson", "brad", "pitt",
    "morgan", "freeman", "keanu", "reeves", "anne", "hathaway", "leonardo", "dicaprio", "oprah", "winfrey",
)  # fmt: skip
PROMPT_WORDS = (
    # articles, prepositions, glue
    "a", "an", "the", "of", "in", "on", "with", "and", "at", "by", "for", "from", "to", "as", "is", "her", "his",
    "their", "top", "front", "background", "behind", "near", "under", "wearing", "holding", "sitting", "standing",
    "walking", "riding", "reading", "playing", "smiling", "looking", "eating", "drinking", "cooking", "dancing",
    # photo / style words
    "photo", "picture", "portrait", "close", "up", "headshot", "selfie", "image", "face", "realistic", "detailed",
    "high", "quality", "painting", "drawing", "sketch", "cartoon", "anime", "style", "oil", "watercolor", "pencil",
    "cubism", "pop", "art", "van", "gogh", "monet", "picasso", "banksy", "digital", "cinematic", "lighting",
    "studio", "professional", "vintage", "black", "white", "colorful", "statue", "sculpture", "marble", "bronze",
    # clothes / accessories
    "sweater", "shirt", "hat", "cap", "scarf", "glasses", "sunglasses", "jacket", "coat", "suit", "tie", "dress",
    "hoodie", "uniform", "outfit", "costume", "helmet", "crown", "headphones", "necklace", "earrings", "mask",
    "chef", "firefighter", "police", "doctor", "astronaut", "wizard", "pirate", "knight", "superhero", "santa",
    "rainbow", "monocle", "beanie", "bandana", "turban", "kimono",
    # colours
    "red", "blue", "green", "yellow", "pink", "purple", "orange", "brown", "gray", "grey", "golden", "silver",
    # places / scenes
    "beach", "city", "street", "forest", "jungle", "snow", "mountain", "mountains", "desert", "park", "garden",
    "office", "library", "kitchen", "cafe", "restaurant", "space", "moon", "ocean", "lake", "river", "field",
    "night", "sunset", "sunrise", "rain", "house", "room", "stage", "concert", "museum", "castle", "bridge",
    "cobblestone", "wooden", "floor", "fabric", "rug", "wall", "brick", "window", "sky", "clouds", "tree", "flowers",
    "boat", "car", "bike", "horse", "dog", "cat", "book", "guitar", "coffee", "cup", "phone", "laptop",
    "eiffel", "tower", "paris", "new", "york", "times", "square", "tokyo", "london",
    # attributes / subjects
    "young", "old", "happy", "sad", "angry", "serious", "surprised", "smile", "hair", "beard", "eyes", "people",
    "child", "baby", "adult", "men", "women", "boys", "girls", "persons", "someone", "subject", "identity",
    # rare tokens used as identifiers by per-identity methods
    "sks", "ohwx", "zwx",
)  # fmt: skip
WORDS: tuple[str, ...] = tuple(dict.fromkeys(CLASS_NOUNS + PROMPT_WORDS + CELEBRITY_NAMES))


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable unicode characters."""
    printable = [range(ord("!"), ord("~") + 1), range(ord("¡"), ord("¬") + 1), range(ord("®"), ord("ÿ") + 1)]
    bs = [b for r in printable for b in r]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def _word_symbols(word: str) -> tuple[str, ...]:
    """A word as CLIP's BPE first sees it: byte-level characters, the last one carrying ``</w>``."""
    table = bytes_to_unicode()
    chars = [table[b] for b in word.encode("utf-8")]
    return tuple(chars[:-1]) + (chars[-1] + EOW,)


def learn_merges(words: Iterable[str]) -> list[tuple[str, str]]:
    """Greedy BPE: repeatedly merge the most frequent adjacent pair until every word is one symbol.

    Ties break on the pair itself (lexicographic), so the result depends only on the word list.
    """
    vocab: dict[tuple[str, ...], int] = Counter(_word_symbols(w) for w in words if w)
    merges: list[tuple[str, str]] = []
    while True:
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, freq in vocab.items():
            for pair in zip(symbols, symbols[1:], strict=False):
                pairs[pair] += freq
        if not pairs:
            return merges
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        joined = best[0] + best[1]
        new_vocab: dict[tuple[str, ...], int] = {}
        for symbols, freq in vocab.items():
            out: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            new_vocab[tuple(out)] = new_vocab.get(tuple(out), 0) + freq
        vocab = new_vocab


def build_vocab(words: Iterable[str] = WORDS) -> tuple[dict[str, int], list[str]]:
    """CLIP-layout ``vocab`` (token -> id) and ``merges`` (``"a b"`` lines, by rank) for ``words``."""
    base = list(bytes_to_unicode().values())
    tokens = base + [c + EOW for c in base]
    merges = learn_merges(words)
    seen = set(tokens)
    for a, b in merges:
        merged = a + b
        if merged not in seen:
            tokens.append(merged)
            seen.add(merged)
    tokens += [BOS, EOS]
    return {tok: i for i, tok in enumerate(tokens)}, [f"{a} {b}" for a, b in merges]


def write_vocab_files(out_dir: str | Path, words: Iterable[str] = WORDS) -> tuple[Path, Path]:
    """Write ``vocab.json`` and ``merges.txt`` (the files ``CLIPTokenizer`` reads) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab(words)
    vocab_path = out / "vocab.json"
    merges_path = out / "merges.txt"
    vocab_path.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_path.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return vocab_path, merges_path


def build_clip_tokenizer(words: Iterable[str] = WORDS, pad_token: str = EOS) -> CLIPTokenizer:
    """A ``CLIPTokenizer`` over the vocabulary of ``words`` (max length 77, CLIP's special tokens).

    ``pad_token`` is ``<|endoftext|>`` as in SD1.5; SDXL's second tokenizer pads with ``"!"``.
    """
    from transformers import CLIPTokenizer

    vocab, merges = build_vocab(words)
    pairs = [tuple(line.split(" ")) for line in merges]  # the tokenizers backend takes (a, b) tuples
    return CLIPTokenizer(vocab=vocab, merges=pairs, pad_token=pad_token, model_max_length=MODEL_MAX_LENGTH)
