import math
import random

import numpy as np
import pytest

from models.prompts import (
    PromptConfig,
    ViewConfig,
    build_prompt,
    cut_value,
    format_value,
    make_views,
    random_drop,
    select_attributes,
    span_drop,
)

MOVIE = {"item_id": "1", "title": "Toy Story (1995)", "release_year": 1995, "genres": ["Animation", "Comedy"]}
BEAUTY = {"title": "Neutrogena Oil-Free Acne Wash Pink Grapefruit Facial Cleanser, 6 Fluid Ounce"}
INSTRUCTION = PromptConfig().instruction


def test_prompt_format_lists_numbers_and_names():
    assert build_prompt(MOVIE) == (
        "The item has the following attributes: title is Toy Story (1995); release year is 1995; "
        "genres is Animation, Comedy"
    )


def test_prompt_custom_separators_selection_and_order():
    cfg = PromptConfig(
        instruction="Movie: ", list_sep="|", attr_sep=". ", attributes=("genres", "title", "absent")
    )
    assert build_prompt(MOVIE, cfg) == "Movie: genres is Animation|Comedy. title is Toy Story (1995)"


def test_whitespace_collapsed_and_missing_values_skipped():
    attrs = {
        "title": "  Toy \n\t Story  ",
        "brand": "",
        "price": float("nan"),
        "desc": None,
        "tags": [],
        "cats": ["", None, " Toys "],
        "rating": 4.5,
        "year": 1995.0,
        "in_stock": True,
    }
    assert select_attributes(attrs) == {
        "title": "Toy Story",
        "cats": "Toys",
        "rating": "4.5",
        "year": "1995",
        "in stock": "true",
    }


def test_numpy_scalars_and_arrays():
    assert format_value(np.int64(7)) == "7"
    assert format_value(np.float32(2.0)) == "2"
    assert format_value(np.float64("nan")) is None
    assert format_value(np.array(["a", "b"])) == "a, b"


def test_empty_item_gives_the_bare_instruction_never_empty():
    assert build_prompt({}) == INSTRUCTION.strip()
    assert build_prompt({"item_id": "9", "title": "   "}) == INSTRUCTION.strip()
    assert build_prompt({}, PromptConfig(instruction="")) == "unknown item"


@pytest.mark.parametrize(
    ("text", "limit", "expected"),
    [
        ("short", 10, "short"),
        ("hello world again", 11, "hello world"),  # cut lands on a boundary
        ("hello world again", 13, "hello world"),  # "hello world a" -> no partial word
        ("Animation, Children's, Comedy", 20, "Animation"),  # trailing separator dropped too
        ("supercalifragilistic", 5, "super"),  # one long word: hard cut
    ],
)
def test_cut_value_at_word_boundary(text, limit, expected):
    assert cut_value(text, limit) == expected


def test_long_value_cut_in_prompt():
    words = " ".join(f"word{i}" for i in range(100))
    value = select_attributes({"description": words}, PromptConfig(max_value_chars=50))["description"]
    assert len(value) <= 50 and words.startswith(value) and words[len(value)] == " "


@pytest.mark.parametrize("rng_factory", [random.Random, np.random.default_rng])
def test_random_drop_count_order_and_determinism(rng_factory):
    attrs = {f"a{i}": str(i) for i in range(10)}
    for ratio, kept in [(0.0, 10), (0.2, 8), (0.25, 7), (0.5, 5), (0.95, 1)]:  # 2.5 rounds half-up to 3
        out = random_drop(attrs, ratio, rng_factory(0))
        assert len(out) == kept
        assert list(out) == [k for k in attrs if k in out]  # order preserved
        assert all(out[k] == attrs[k] for k in out)
    assert random_drop(attrs, 0.5, rng_factory(3)) == random_drop(attrs, 0.5, rng_factory(3))
    draws = {tuple(random_drop(attrs, 0.5, rng_factory(s))) for s in range(20)}
    assert len(draws) > 1


def test_random_drop_keeps_at_least_one():
    rng = random.Random(0)
    assert random_drop({"title": "x"}, 0.9, rng) == {"title": "x"}
    assert len(random_drop({"a": "1", "b": "2"}, 0.9, rng)) == 1
    assert random_drop({}, 0.5, rng) == {}


@pytest.mark.parametrize("rng_factory", [random.Random, np.random.default_rng])
def test_span_drop_invariants(rng_factory):
    value = "one two three four five six seven eight nine ten"
    words = value.split()
    for seed in range(30):
        out = span_drop(value, 0.3, rng_factory(seed)).split()
        assert len(out) == 7
        # one contiguous span removed: what is left is a prefix + a suffix of the original words
        start = next((i for i, (a, b) in enumerate(zip(out, words)) if a != b), len(out))
        assert out[:start] == words[:start] and out[start:] == words[start + 3 :]
    assert span_drop(value, 0.3, rng_factory(1)) == span_drop(value, 0.3, rng_factory(1))
    assert span_drop("single", 0.9, rng_factory(0)) == "single"
    assert span_drop("two words", 0.9, rng_factory(0)) in {"two", "words"}
    assert span_drop("a  b\n c", 0.0, rng_factory(0)) == "a b c"


def _is_subsequence(small: list[str], big: list[str]) -> bool:
    it = iter(big)
    return all(any(word == other or other.startswith(word) for other in it) for word in small)


def test_make_views_auto_uses_span_drop_for_single_attribute_items():
    cfg = ViewConfig(attr_drop=0.5, span_drop=0.3, mode="auto")
    full = build_prompt(BEAUTY)
    v1, v2 = make_views(BEAUTY, cfg, random.Random(0))
    for view in (v1, v2):
        assert view.startswith(INSTRUCTION + "title is ")
        n_title = len(full.split()) - len(INSTRUCTION.split()) - 2
        assert len(view.split()) == len(full.split()) - round(0.3 * n_title)
        assert _is_subsequence(view.split(), full.split())
    assert make_views(BEAUTY, cfg, random.Random(0)) == (v1, v2)
    # attr mode on a one-attribute item cannot drop anything: both views are the full prompt
    assert make_views(BEAUTY, ViewConfig(mode="attr"), random.Random(0)) == (full, full)


def test_make_views_auto_uses_attribute_drop_for_multi_attribute_items():
    cfg = ViewConfig(attr_drop=0.34, mode="auto")  # 3 attributes -> drop 1
    full_parts = build_prompt(MOVIE)[len(INSTRUCTION) :].split("; ")
    for seed in range(10):
        for view in make_views(MOVIE, cfg, np.random.default_rng(seed)):
            parts = view[len(INSTRUCTION) :].split("; ")
            assert len(parts) == 2 and all(part in full_parts for part in parts)


def test_make_views_span_mode_touches_every_value_and_never_empty():
    attrs = {"title": "a b c d e f g h i j", "brand": "acme corp"}
    v1, v2 = make_views(attrs, ViewConfig(span_drop=0.5, mode="span"), random.Random(4))
    for view in (v1, v2):
        title, brand = view[len(INSTRUCTION) :].split("; ")
        assert len(title.split()) == 2 + 5 and len(brand.split()) == 2 + 1  # "<name> is" + kept words
    for attrs in ({}, {"title": None}):
        assert make_views(attrs, ViewConfig(), random.Random(0)) == (INSTRUCTION.strip(),) * 2


def test_config_validation():
    with pytest.raises(ValueError):
        ViewConfig(attr_drop=1.0)
    with pytest.raises(ValueError):
        ViewConfig(mode="words")
    with pytest.raises(ValueError):
        PromptConfig(max_value_chars=0)
    assert PromptConfig(attributes=["a"]).attributes == ("a",)
    assert math.isclose(ViewConfig().attr_drop, 0.2)
