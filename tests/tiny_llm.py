"""Tiny random-weight LLaMA checkpoints + a synthetic catalog, for the SCFT and embedding tests (built in-process).

Import with ``from tests.tiny_llm import ...`` (pytest puts the repo root on sys.path).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from training.data.dataset import PreparedDataset

INSTRUCTION = "The toy has the following attributes: "
TITLES = "red blue green small large wooden metal soft fast slow old new bright dark round square".split()
KINDS = "car ball doll train robot kite puzzle drum boat plane bear block".split()
GENRES = "action comedy drama puzzle music sport outdoor baby".split()
WORDS = sorted(
    set(TITLES + KINDS + GENRES)
    | set("the toy has following attributes : title is ; year genres , kind".split())
    | {str(y) for y in range(1990, 2000)}
)


def build_tiny_llama(path: str | Path, words: list[str] | None = None, seed: int = 0) -> Path:
    """Write a 2-layer, d=32 random LLaMA (LM head included, as a real checkout) + word-level tokenizer to ``path``.

    The tokenizer has BOS/EOS but no pad token (like LLaMA's); unknown words map to <unk>.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    vocab = {token: i for i, token in enumerate(specials + list(words or WORDS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    path = Path(path)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def toy_dataset(n_items: int = 40, seed: int = 0) -> PreparedDataset:
    """A PreparedDataset of ``n_items`` toys with 3 attributes each (title, year, genres), ids 1..n_items."""
    rng = np.random.default_rng(seed)
    attributes: list[dict] = [{}]
    for _ in range(n_items):
        title = f"{rng.choice(TITLES)} {rng.choice(TITLES)} {rng.choice(KINDS)}"
        genres = [str(g) for g in rng.choice(GENRES, size=int(rng.integers(1, 3)), replace=False)]
        attributes.append({"title": title, "year": str(int(rng.integers(1990, 2000))), "genres": genres})
    sequences = [np.arange(1, n_items + 1, dtype=np.int64)[i : i + 5] for i in range(0, n_items - 4, 5)]
    return PreparedDataset(
        name="toys",
        item_ids=["<pad>"] + [f"t{i}" for i in range(1, n_items + 1)],
        user_ids=[f"u{i}" for i in range(len(sequences))],
        sequences=sequences,
        attributes=attributes,
        instruction=INSTRUCTION,
    )


def write_toy_dataset(directory: str | Path, n_items: int = 150, n_users: int = 80, seed: int = 0) -> Path:
    """A canonical dataset dir (interactions.csv + items.jsonl) of ``n_items`` toys that every user walks in
    order (item i followed by i + 1), so a sequential model has something to learn; each user sees few enough
    items for the 100 sampled negatives. For `prepare` with ``SplitConfig(user_core=3, item_core=1)`` (items no
    user reaches are dropped there: 143 items remain with the defaults)."""
    import json

    rng = np.random.default_rng(seed)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rows, ts = ["user_id,item_id,timestamp"], 0
    for u in range(n_users):
        start, length = (u * 7) % (n_items - 10), int(rng.integers(5, 11))
        for i in range(start + 1, min(start + length, n_items) + 1):
            ts += 1
            rows.append(f"u{u},t{i},{ts}")
    (directory / "interactions.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    with open(directory / "items.jsonl", "w", encoding="utf-8") as f:
        for i in range(1, n_items + 1):
            title = f"{rng.choice(TITLES)} {rng.choice(TITLES)} {rng.choice(KINDS)}"
            genres = [str(g) for g in rng.choice(GENRES, size=int(rng.integers(1, 3)), replace=False)]
            item = {
                "item_id": f"t{i}",
                "title": title,
                "year": int(rng.integers(1990, 2000)),
                "genres": genres,
            }
            f.write(json.dumps(item) + "\n")
    return directory


def walk_dataset(
    n_items: int = 150, start_below: int | None = None, lengths: tuple[int, int] = (5, 11), wrap: bool = False
) -> PreparedDataset:
    """60 users walking the catalog in steps of one (item i is followed by item i + 1), ids 1..n_items, no attributes.

    Starts are drawn below ``start_below`` (default n_items), lengths in [lengths[0], lengths[1]); with ``wrap`` a walk
    past the last item continues at item 1. The evaluator's sampled protocol needs >= 100 unseen items per user.
    """
    rng = np.random.default_rng(0)
    seqs = []
    for _ in range(60):
        start, length = rng.integers(0, start_below or n_items), rng.integers(*lengths)
        steps = start + np.arange(length)
        seqs.append(((steps % n_items if wrap else steps) + 1).astype(np.int64))
    return PreparedDataset(
        name="synthetic",
        item_ids=["<pad>"] + [f"i{i}" for i in range(1, n_items + 1)],
        user_ids=[f"u{u}" for u in range(len(seqs))],
        sequences=seqs,
        attributes=[{} for _ in range(n_items + 1)],
    )
