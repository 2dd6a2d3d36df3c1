"""Item attributes -> prompt text (paper Eq. 2), and the two augmented views used by SCFT (Eq. 3).

A prompt is ``I + "<attr> is <value>; <attr> is <value>"``::

    >>> build_prompt({"title": "Toy Story (1995)", "genres": ["Animation", "Comedy"]})
    'The item has the following attributes: title is Toy Story (1995); genres is Animation, Comedy'

Values are normalised before use: whitespace collapsed, lists joined with ``list_sep``, integral floats written
as integers (``1995.0`` -> ``1995``), and long values cut at a word boundary. Missing values (``None``, NaN,
empty strings / lists) are skipped, so a sparse catalog never yields "price is nan". Attribute names have ``_``
replaced by a space ("release_year" -> "release year") because the LLM reads the prompt as prose.

Views. The paper's RandomDrop removes a ratio of the attributes, but many real catalogs are uneven: Amazon Beauty
items carry only a title, so dropping attributes would give two identical views. ``make_views`` therefore falls
back ("auto" mode) to dropping a span of words inside the single value. Every view is built only from the item's
own (normalised) words, never from an empty string, and is deterministic given the ``rng`` passed in.
"""

from __future__ import annotations

import math
import numbers
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

Rng = random.Random | np.random.Generator

# Characters stripped from the end of a cut value, so "Animation, Children's" cut to "Animation," ends cleanly.
_TRAILING_SEPARATORS = " ,;:"
# Stands in for an item with no usable attribute and an empty instruction: a decoder without BOS needs >= 1 token.
EMPTY_ITEM_TEXT = "unknown item"


@dataclass(frozen=True)
class PromptConfig:
    """How an item's attributes become a prompt."""

    instruction: str = "The item has the following attributes: "
    max_value_chars: int = 200  # per value; long descriptions would otherwise crowd out every other attribute
    list_sep: str = ", "
    attr_sep: str = "; "
    attributes: tuple[str, ...] | None = None  # selection and order; None = all, in the order given
    exclude: tuple[str, ...] = ("item_id",)  # items.jsonl rows carry their id, which is not semantics

    def __post_init__(self) -> None:
        if self.max_value_chars < 1:
            raise ValueError(f"max_value_chars must be >= 1, got {self.max_value_chars}")
        if self.attributes is not None and not isinstance(self.attributes, tuple):
            object.__setattr__(self, "attributes", tuple(self.attributes))


@dataclass(frozen=True)
class ViewConfig:
    """How SCFT's two positive views of one item are made.

    mode: "attr" = RandomDrop of ``attr_drop`` of the attributes (the paper); "span" = drop a contiguous span of
    ``span_drop`` of the words inside every value; "auto" = "attr" for items with >= 2 attributes, else "span".
    """

    attr_drop: float = 0.2
    span_drop: float = 0.2
    mode: Literal["attr", "span", "auto"] = "auto"

    def __post_init__(self) -> None:
        for name in ("attr_drop", "span_drop"):
            ratio = getattr(self, name)
            if not 0.0 <= ratio < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {ratio}")
        if self.mode not in ("attr", "span", "auto"):
            raise ValueError(f"mode must be 'attr', 'span' or 'auto', got {self.mode!r}")


def _collapse(text: str) -> str:
    return " ".join(text.split())


def _scalar_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        value = float(value)
        if math.isnan(value) or math.isinf(value):
            return None  # pandas' missing value
        return str(int(value)) if value.is_integer() else repr(value)
    return _collapse(str(value)) or None


def cut_value(text: str, max_chars: int) -> str:
    """Cut ``text`` to at most ``max_chars`` characters at a word boundary (no trailing partial word).

    A single word longer than ``max_chars`` is hard-cut, as there is no boundary to cut at.
    """
    if len(text) <= max_chars:
        return text
    head = text[:max_chars]
    if not text[max_chars].isspace():
        space = head.rfind(" ")
        if space > 0:
            head = head[:space]
    return head.rstrip(_TRAILING_SEPARATORS) or head.rstrip() or head


def format_value(value: Any, cfg: PromptConfig = PromptConfig()) -> str | None:
    """One attribute value as prompt text, or None when it is missing or empty."""
    if isinstance(value, list | tuple | set | frozenset | np.ndarray):
        parts = [text for text in map(_scalar_text, value) if text]
        text = cfg.list_sep.join(parts) if parts else None
    else:
        text = _scalar_text(value)
    return cut_value(text, cfg.max_value_chars) if text else None


def select_attributes(attrs: Mapping[str, Any], cfg: PromptConfig = PromptConfig()) -> dict[str, str]:
    """The item's usable attributes, in prompt order: ``{readable name: formatted value}``; missing ones left out."""
    names = cfg.attributes if cfg.attributes is not None else tuple(attrs)
    selected: dict[str, str] = {}
    for name in names:
        if name in cfg.exclude or name not in attrs:
            continue
        text = format_value(attrs[name], cfg)
        label = _collapse(str(name).replace("_", " "))
        if text and label:
            selected[label] = text
    return selected


def _join(selected: Mapping[str, str], cfg: PromptConfig) -> str:
    if not selected:
        # An item with nothing to say gets the bare instruction: all such items share one embedding, which is honest.
        return cfg.instruction.strip() or EMPTY_ITEM_TEXT
    body = cfg.attr_sep.join(f"{name} is {value}" for name, value in selected.items())
    return f"{cfg.instruction}{body}"


def build_prompt(attrs: Mapping[str, Any], cfg: PromptConfig = PromptConfig()) -> str:
    """Prompt ``T_i = [I, A_1, ..., A_K]`` (paper Eq. 2). Never empty; see the module docstring for normalisation."""
    return _join(select_attributes(attrs, cfg), cfg)


def _drop_count(ratio: float, n: int) -> int:
    # Half-up rounding (Python's round() is banker's: round(2.5) == 2); always keep at least one.
    return max(0, min(int(ratio * n + 0.5), n - 1))


def _sample(rng: Rng, n: int, k: int) -> list[int]:
    if isinstance(rng, np.random.Generator):
        return sorted(int(i) for i in rng.choice(n, size=k, replace=False))
    return sorted(rng.sample(range(n), k))


def _randint(rng: Rng, high: int) -> int:
    """Uniform integer in [0, high]."""
    if isinstance(rng, np.random.Generator):
        return int(rng.integers(0, high + 1))
    return rng.randint(0, high)


def random_drop(attrs: Mapping[str, Any], ratio: float, rng: Rng) -> dict[str, Any]:
    """RandomDrop (paper Eq. 3): drop ``round(ratio * K)`` of the K attributes, keeping >= 1, order preserved.

    ``attrs`` should hold usable values only (see ``select_attributes``); an empty mapping is returned empty.
    """
    names = list(attrs)
    dropped = {names[i] for i in _sample(rng, len(names), _drop_count(ratio, len(names)))} if names else set()
    return {name: value for name, value in attrs.items() if name not in dropped}


def span_drop(text_value: str, ratio: float, rng: Rng) -> str:
    """Drop one contiguous span of ``round(ratio * n)`` of the value's n words, keeping >= 1 word.

    One span (rather than scattered words) mimics a missing phrase of a title; what remains is still the value's
    own words, in order.
    """
    words = text_value.split()
    n_drop = _drop_count(ratio, len(words))
    if n_drop == 0:
        return " ".join(words)
    start = _randint(rng, len(words) - n_drop)
    kept = " ".join(words[:start] + words[start + n_drop :])
    return kept.rstrip(_TRAILING_SEPARATORS) or kept


def make_views(
    attrs: Mapping[str, Any], cfg: ViewConfig, rng: Rng, prompt: PromptConfig = PromptConfig()
) -> tuple[str, str]:
    """Two augmented prompts of one item (the SCFT positive pair); deterministic given ``rng``'s state."""
    selected = select_attributes(attrs, prompt)
    use_span = cfg.mode == "span" or (cfg.mode == "auto" and len(selected) == 1)

    def view() -> str:
        if use_span:
            kept = {name: span_drop(value, cfg.span_drop, rng) for name, value in selected.items()}
        else:
            kept = random_drop(selected, cfg.attr_drop, rng)
        return _join(kept, prompt)

    first = view()
    return first, view()
