"""training/pipeline.py, training/export.py and their commands (`llmemb pipeline`, `export`, `embed`,
`train scft`): the whole method on a tiny random LLaMA + a synthetic catalog, skip-on-rerun, the exported bundle
reproducing the evaluation exactly, config and argument errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import training.embed
import training.export
import training.rat
import training.scft
import training.srs
from llmemb.cli import main as cli
from models.bundle import current_bundle_id, load_bundle
from models.llm import LLMConfig, locate_source
from models.prompts import PromptConfig, build_prompt
from models.srs import FrozenTableEncoder, SRSConfig, build_backbone
from tests.tiny_llm import build_tiny_llama, write_toy_dataset
from training.embed import catalog_prompts, load_embedder, read_table_metadata, source_sha256
from training.evaluate import Evaluator
from training.export import ExportError, export_bundle
from training.pipeline import (
    _KEYS,
    ConfigError,
    config_from_dict,
    load_config,
    parse_override,
    run_pipeline,
    tomllib,
)
from training.split import SplitConfig, prepare

pytestmark = pytest.mark.usefixtures("one_thread")
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def tiny_config(base: Path, **changes) -> dict:
    """TOML-shaped tables of a seconds-long pipeline on the tiny LLaMA and toy dataset under `base`."""
    raw = {
        "run": {"root": str(base / "runs"), "seeds": [42], "device": "cpu", "progress": False},
        "data": {
            "dataset": str(base / "toys"),
            "user_core": 3,
            "item_core": 1,
            "cache_dir": str(base / "cache"),
        },
        "llm": {"source": str(base / "llama"), "max_length": 32, "cache_dir": str(base / "llm-cache")},
        "scft": {"max_steps": 2, "batch_size": 8, "probe_items": 8, "lora": {"r": 4, "alpha": 8}},
        "embed": {"batch_size": 16},
        "pca": {"d_m": 16},
        "srs": {
            "hidden": 16,
            "n_layers": 1,
            "n_heads": 2,
            "max_len": 12,
            "max_epochs": 2,
            "batch_size": 32,
            "dropout": 0.1,
        },
        "rat": {"method": "LLMEmb+gatedID", "gamma": 0.1},
        "export": {"artifacts": str(base / "artifacts")},
    }
    for dotted, value in changes.items():
        table, key = dotted.split(".")
        raw[table][key] = value
    return raw


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("pipeline")
    build_tiny_llama(base / "llama")
    write_toy_dataset(base / "toys")
    return base


@pytest.fixture(scope="module")
def first(base):
    """The first pipeline run (every stage trains)."""
    torch.set_num_threads(1)
    return run_pipeline(config_from_dict(tiny_config(base)), say=lambda line: None)


def test_first_run_runs_every_stage_into_keyed_dirs(first, base) -> None:
    assert [s.name for s in first.stages] == [
        "prepare",
        "scft",
        "embed",
        "pca",
        "id",
        "rat",
        "evaluate",
        "export",
    ]
    assert first.trained == [s.name for s in first.stages]
    dirs = {s.name: s.dir for s in first.stages}
    for name, d in dirs.items():
        assert d.parent == base / "runs" / "toys" and d.name.startswith(f"{name}-")
    assert (dirs["scft"] / "lora" / "adapter_model.safetensors").is_file()
    assert (dirs["embed"] / "llm.safetensors").is_file() and (dirs["pca"] / "pca.safetensors").is_file()
    for stage in ("id", "rat"):
        assert (dirs[stage] / "seed42" / "model.safetensors").is_file()
        assert (dirs[stage] / "seed42" / "metrics.json").is_file()
    methods = {(r["method"], r["llm"]) for r in first.records}
    assert methods == {("None", None), ("LLMEmb+gatedID", "llama+scft")}
    assert first.bundle.parent == base / "artifacts" / "bundles"
    assert current_bundle_id(base / "artifacts") == first.bundle.name


def test_second_run_does_no_training(first, base, monkeypatch) -> None:
    def forbidden(*args, **kwargs):
        raise AssertionError("a stage did work on a rerun with the same config")

    for module, name in (
        (training.scft, "main"),
        (training.srs, "main"),
        (training.rat, "main"),
        (training.embed, "embed_catalog"),
        (training.embed, "load_embedder"),
        (training.export, "export_bundle"),
    ):
        monkeypatch.setattr(module, name, forbidden)
    monkeypatch.setattr("models.llm.LLMEmbedder", forbidden)
    again = run_pipeline(config_from_dict(tiny_config(base)), say=lambda line: None)
    assert again.trained == []
    assert [s.dir for s in again.stages] == [s.dir for s in first.stages]
    assert again.bundle == first.bundle and again.records == first.records


def test_changing_a_rat_key_reruns_only_rat_and_downstream(first, base) -> None:
    raw = tiny_config(base, **{"rat.gamma": 0.5, "export.set_current": False})
    changed = run_pipeline(config_from_dict(raw), say=lambda line: None)
    assert changed.trained == ["rat", "evaluate", "export"]
    assert changed.stage("id").dir == first.stage("id").dir
    assert changed.stage("rat").dir != first.stage("rat").dir
    assert changed.bundle != first.bundle
    assert current_bundle_id(base / "artifacts") == first.bundle.name  # set_current = false


def test_exported_bundle_reproduces_the_evaluation_exactly(first, base) -> None:
    b = load_bundle(base / "artifacts")  # follows CURRENT; verifies every sha256
    assert b.bundle_id == first.bundle.name
    data = first.data
    # the backbone from the bundle's item table + srs state, loaded strictly as docs/ARTIFACTS.md shows
    model = build_backbone(b.srs_backbone, SRSConfig(**b.srs_config), FrozenTableEncoder(b.table("item")))
    model.load_state_dict(b.srs_state)
    model.eval()
    with torch.no_grad():
        again = Evaluator(data, 42).evaluate(model, "test")
    assert again == first.per_seed["LLMEmb+gatedID"][42]
    assert json.loads(json.dumps(again)) == b.manifest.metrics["test"]
    # the rows are the dataset's items, with their external ids and attributes
    assert b.n_items == data.n_items and [it.id for it in b.items[1:]] == data.item_ids[1:]
    assert b.items[5].attributes == data.attributes[5]
    assert {n: tuple(t.shape) for n, t in b.tables.items()} == {
        "llm": (data.n_items + 1, 32),
        "pca": (data.n_items + 1, 16),
        "item": (data.n_items + 1, 16),
    }
    torch.testing.assert_close(b.table("pca")[1:], b.pca.transform(b.table("llm"))[1:], rtol=0, atol=0)
    assert float(b.table("item")[0].abs().sum()) == 0.0


def test_bundle_names_what_the_service_needs_to_embed_a_new_item(first, base) -> None:
    b = load_bundle(first.bundle)
    m = b.manifest
    assert m.base_llm.source == str((base / "llama").resolve()) and locate_source(m.base_llm.source).is_dir()
    assert m.base_llm.sha256 == source_sha256(LLMConfig(source=str(base / "llama")))
    assert m.configs["llm"]["pooling"] == "mean" and m.configs["llm"]["max_length"] == 32
    assert m.configs["lora"]["r"] == 4 and m.configs["lora"]["sha256"]
    assert m.configs["training"]["method"] == "LLMEmb+gatedID"
    assert m.configs["training"]["pipeline"]["stages"]["rat"] == first.stage("rat").key
    assert m.dataset["name"] == "toys" and m.dataset["n_items"] == first.data.n_items
    # prompt config + base LLM + LoRA from the bundle alone rebuild the catalog's llm rows
    prompt = PromptConfig(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in m.configs["prompt"].items()}
    )
    llm = {k: v for k, v in m.configs["llm"].items() if k != "embedded_dtype"}
    embedder = load_embedder(LLMConfig(**{**llm, "source": m.base_llm.source}), b.lora_dir)
    rows = [1, 2, first.data.n_items]
    vectors = embedder.embed([build_prompt(b.items[r].attributes, prompt) for r in rows])
    torch.testing.assert_close(vectors, b.table("llm")[rows], rtol=1e-4, atol=1e-5)


def test_export_refuses_parts_that_do_not_belong_together(first, base, tmp_path) -> None:
    data, run = first.data, first.stage("rat").dir / "seed42"
    table, lora = first.stage("embed").dir / "llm.safetensors", first.stage("scft").dir / "lora"
    out = tmp_path / "artifacts"
    with pytest.raises(ExportError, match="pass its directory"):
        export_bundle(out, data, run, table)  # the table was embedded with a LoRA
    with pytest.raises(ExportError, match="does not rebuild the prompts"):
        export_bundle(out, data, run, table, lora, prompt_cfg=PromptConfig(instruction="Another: "))
    with pytest.raises(ExportError, match="pass the LLM table"):
        export_bundle(out, data, run, None)
    other = prepare(base / "toys", SplitConfig(user_core=3, item_core=2), cache_dir=base / "cache")
    with pytest.raises(ExportError, match="items"):
        export_bundle(out, other, run, table, lora)
    assert not out.exists() or not any((out / "bundles").iterdir())  # nothing half-written


def test_export_command_writes_a_bundle(first, base, tmp_path, capsys) -> None:
    args = ["export", "--dataset", str(base / "toys"), "--user-core", "3", "--item-core", "1"]
    args += ["--cache-dir", str(base / "cache"), "--run", str(first.stage("rat").dir / "seed42")]
    args += ["--llm-table", str(first.stage("embed").dir / "llm.safetensors")]
    args += [
        "--lora",
        str(first.stage("scft").dir / "lora"),
        "--artifacts",
        str(tmp_path),
        "--bundle-id",
        "b1",
    ]
    assert cli(args) == 0
    assert "bundle: " in capsys.readouterr().out
    b = load_bundle(tmp_path)
    assert b.bundle_id == "b1"
    torch.testing.assert_close(b.table("item"), load_bundle(first.bundle).table("item"), rtol=0, atol=0)
    with pytest.raises(SystemExit, match="already exists"):
        cli(args)  # bundles are immutable
    with pytest.raises(SystemExit, match="not a run directory"):
        cli([*args[: args.index("--run")], "--run", str(tmp_path), "--artifacts", str(tmp_path / "x")])


def test_scft_and_embed_commands(base, tmp_path, capsys) -> None:
    data_args = ["--dataset", str(base / "toys"), "--user-core", "3", "--item-core", "1"]
    data_args += ["--cache-dir", str(base / "cache")]
    assert (
        cli(
            ["train", "scft", *data_args, "--llm", str(base / "llama"), "--max-length", "32"]
            + ["--max-steps", "2", "--batch-size", "4", "--probe-items", "0", "--out", str(tmp_path / "scft")]
        )
        == 0
    )
    lora = tmp_path / "scft" / "lora"
    assert (
        lora / "adapter_model.safetensors"
    ).is_file() and f"LoRA adapter: {lora}" in capsys.readouterr().out
    out = tmp_path / "table.safetensors"
    # the LLM, max length and prompt settings default to the ones SCFT trained with (its scft.json)
    assert (
        cli(["embed", *data_args, "--lora", str(lora), "--out", str(out), "--batch-size", "7", "--quiet"])
        == 0
    )
    meta = read_table_metadata(out)
    assert meta["model_source"] == str(base / "llama") and meta["max_length"] == "32"
    assert meta["lora_sha256"] == training.embed.lora_sha256(lora)
    data = prepare(base / "toys", SplitConfig(user_core=3, item_core=1), cache_dir=base / "cache")
    prompt = training.embed.prompt_config_of(meta)
    assert prompt == PromptConfig(instruction=data.instruction)
    assert meta["prompts_sha256"] == training.export.prompts_sha256(catalog_prompts(data, prompt))


def test_shipped_configs_load_and_document_every_key() -> None:
    text = (CONFIGS / "default.toml").read_text(encoding="utf-8")
    raw = tomllib.loads(text)
    assert raw["rat"]["method"] == "LLMEmb+gatedID" and raw["rat"]["gamma"] == 0.1
    assert raw["run"]["seeds"] == [42]
    lines = [line.lstrip("# ").split("=")[0].strip() for line in text.splitlines()]
    for table, keys in _KEYS.items():
        for key in keys:
            if key not in ("lora", "views"):
                assert key in lines, f"configs/default.toml does not document [{table}] {key}"
    for path in sorted(CONFIGS.glob("*.toml")):
        cfg = load_config(path)
        assert cfg.method in ("LLMEmb", "LLMEmb+gatedID"), path


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"trainer": {}}, r"unknown table\(s\) \['trainer'\]"),
        ({"scft": {"stepz": 3}}, r"\[scft\] has unknown key\(s\) \['stepz'\]; valid keys: enabled"),
        ({"scft": {"lora": {"rank": 3}}}, r"\[scft.lora\] has unknown key"),
        ({"scft": {"batch_size": 1}}, r"\[scft\]: batch_size must be >= 2"),
        ({"srs": {"backbone": "sasrec"}}, r"\[srs\] has unknown key"),
        ({"srs": {"max_epochs": 0}}, r"\[srs\]: max_epochs must be >= 1"),
        ({"rat": {"method": "Bogus"}}, r"\[rat\] method must be one of"),
        ({"rat": {"method": "None"}}, r"ID-SASRec stage itself"),
        ({"rat": {"backbone": "lstm"}}, r"\[rat\] backbone must be one of"),
        ({"rat": {"gamma": 0}}, r"\[rat\]: gamma must be > 0"),
        ({"run": {"seeds": []}}, r"\[run\]: seeds must be"),
        ({"data": {"user_core": 2}}, r"\[data\]: user_core must be >= 3"),
        ({"llm": {"device": "cpu"}}, r"\[llm\] has unknown key\(s\) \['device'\]"),
        ({"export": {"seed": 7}}, r"\[export\] seed 7 is not one of \[run\] seeds"),
        ({"embed": {"batch_size": 0}}, r"\[embed\]: batch_size must be >= 1"),
    ],
)
def test_bad_configs_are_refused_with_the_table_and_key(raw, message) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw, "x.toml")


def test_overrides_and_config_file_errors(tmp_path) -> None:
    assert parse_override("scft.max_steps=5") == ("scft.max_steps", 5)
    assert parse_override("run.seeds=[42, 43]") == ("run.seeds", [42, 43])
    assert parse_override("llm.source=minilm") == ("llm.source", "minilm")  # bare words stay strings
    assert parse_override('rat.method="LLMEmb w/o align"') == ("rat.method", "LLMEmb w/o align")
    cfg = load_config(CONFIGS / "default.toml", {"scft.max_steps": 5, "scft.lora.r": 4})
    assert cfg.scft_config().max_steps == 5 and cfg.scft_config().lora.r == 4
    with pytest.raises(ConfigError, match="expected TABLE.KEY=VALUE"):
        parse_override("max_steps=5")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("[run\nseeds = 1", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(tmp_path / "bad.toml")


def test_command_line_errors(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit, match="does not exist"):
        cli(["pipeline", "--config", str(tmp_path / "nope.toml")])
    with pytest.raises(SystemExit, match="unknown key"):
        cli(["pipeline", "--config", str(CONFIGS / "default.toml"), "--set", "scft.stepz=1"])
    with pytest.raises(SystemExit, match="TABLE.KEY=VALUE"):
        cli(["pipeline", "--set", "oops"])
    with pytest.raises(SystemExit) as e:
        cli(["export", "--artifacts", str(tmp_path)])  # --run is required
    assert e.value.code == 2 and "--run" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="batch-size must be >= 1"):
        cli(["embed", "--batch-size", "0"])
    with pytest.raises(SystemExit, match="not a peft adapter dir"):
        cli(["embed", "--lora", str(tmp_path)])
    with pytest.raises(SystemExit, match="batch_size must be >= 2"):
        cli(["train", "scft", "--batch-size", "1"])
