import pytest
import torch
from safetensors.torch import load_file

import training.embed as embed_mod
from models.llm import LLMConfig, LLMEmbedder, LoraSettings, apply_lora, save_lora
from models.prompts import PromptConfig, build_prompt
from tests.tiny_llm import build_tiny_llama, toy_dataset
from training.embed import (
    catalog_prompts,
    embed_catalog,
    load_embedder,
    load_table,
    lora_sha256,
    read_table_metadata,
)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def data():
    return toy_dataset(23)  # odd, so no batch size divides it


@pytest.fixture(scope="module")
def prompts(data):
    return catalog_prompts(data, PromptConfig(instruction=data.instruction))


@pytest.fixture(scope="module")
def embedder(llama_dir):
    return LLMEmbedder(LLMConfig(source=str(llama_dir), device="cpu", dtype="float32"))


@pytest.fixture(scope="module")
def lora_dir(llama_dir, tmp_path_factory):
    """A saved adapter with non-zero B matrices (a fresh LoRA is the identity)."""
    emb = LLMEmbedder(LLMConfig(source=str(llama_dir), device="cpu"))
    model = apply_lora(emb.model, LoraSettings(r=4, alpha=8, dropout=0.0))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    path = tmp_path_factory.mktemp("lora") / "lora"
    save_lora(model, path)
    return path


def test_catalog_prompts_follow_internal_ids(data, prompts):
    assert len(prompts) == data.n_items
    cfg = PromptConfig(instruction=data.instruction)
    assert prompts[0] == build_prompt(data.attributes[1], cfg)
    assert prompts[-1] == build_prompt(data.attributes[data.n_items], cfg)
    assert prompts[0].startswith(data.instruction)


def test_table_is_batch_size_invariant_with_a_zero_padding_row(embedder, prompts, tmp_path):
    tables = [
        embed_catalog(embedder, prompts, tmp_path / f"b{bs}.safetensors", batch_size=bs, progress=False)
        for bs in (1, 3, 8, 64)
    ]
    for table in tables:
        assert table.shape == (len(prompts) + 1, 32) and table.dtype == torch.float32
        assert torch.equal(table[0], torch.zeros(32))
        torch.testing.assert_close(table, tables[0], atol=1e-5, rtol=0)
    # rows align with internal ids: row i is item i's prompt embedded alone
    for i in (1, 7, len(prompts)):
        torch.testing.assert_close(tables[1][i], embedder.embed([prompts[i - 1]])[0], atol=1e-5, rtol=0)
    on_disk = load_file(str(tmp_path / "b3.safetensors"))
    assert set(on_disk) == {"weight"}
    torch.testing.assert_close(on_disk["weight"], tables[1], atol=0, rtol=0)


def test_metadata_records_model_adapter_and_prompts(embedder, prompts, tmp_path):
    out = tmp_path / "llm.safetensors"
    embed_catalog(embedder, prompts, out, progress=False, extra_metadata={"prompt_config": "abc"})
    meta = read_table_metadata(out)
    assert meta["format"] == "llmemb.table" and meta["table"] == "llm"
    assert (meta["rows"], meta["dim"], meta["padding_row"]) == (str(len(prompts) + 1), "32", "0")
    assert len(meta["model_sha256"]) == 64 and meta["lora_sha256"] == "none"
    assert len(meta["prompts_sha256"]) == 64 and meta["prompt_config"] == "abc"
    assert meta["dtype"] == "float32" and meta["max_length"] == str(embedder.max_length)
    assert float(meta["seconds"]) >= 0
    with pytest.raises(ValueError, match="overwrite"):
        embed_catalog(embedder, prompts, out, extra_metadata={"rows": "1"})


def test_existing_table_with_same_metadata_is_reused(embedder, prompts, tmp_path, monkeypatch):
    out = tmp_path / "llm.safetensors"
    first = embed_catalog(embedder, prompts, out, progress=False)
    stamp = out.stat().st_mtime_ns

    def no_forward(*args, **kwargs):
        raise AssertionError("the table should have been reused")

    monkeypatch.setattr(embedder, "forward_pooled", no_forward)
    again = embed_catalog(embedder, prompts, out, batch_size=5, progress=False)
    assert out.stat().st_mtime_ns == stamp
    torch.testing.assert_close(again, first, atol=0, rtol=0)
    monkeypatch.undo()
    changed = embed_catalog(
        embedder, prompts[:-1] + ["the toy has the following attributes : title is red car"], out
    )
    assert out.stat().st_mtime_ns != stamp
    assert not torch.equal(changed[-1], first[-1]) and torch.equal(changed[1], first[1])


def test_write_is_atomic(embedder, prompts, tmp_path, monkeypatch):
    out = tmp_path / "llm.safetensors"
    good = embed_catalog(embedder, prompts, out, progress=False)

    def broken_save(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(embed_mod, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        embed_catalog(embedder, prompts[:5], out, progress=False)
    torch.testing.assert_close(load_table(out), good, atol=0, rtol=0)  # the old table is intact
    assert [p.name for p in tmp_path.iterdir()] == ["llm.safetensors"]  # and no temp file is left


def test_load_embedder_applies_and_merges_lora(llama_dir, lora_dir, prompts, tmp_path):
    cfg = LLMConfig(source=str(llama_dir), device="cpu")
    base = load_embedder(cfg)
    merged = load_embedder(cfg, lora_dir, merge=True)
    unmerged = load_embedder(cfg, lora_dir, merge=False)
    assert type(merged.model).__name__ == "LlamaModel" and not merged.model.training
    assert type(unmerged.model).__name__ == "PeftModel"
    e_base, e_merged, e_unmerged = (e.embed(prompts[:6]) for e in (base, merged, unmerged))
    torch.testing.assert_close(e_merged, e_unmerged, atol=1e-5, rtol=0)
    assert (e_merged - e_base).abs().max() > 1e-3  # the adapter does change the embeddings
    assert merged.lora_sha256 == unmerged.lora_sha256 == lora_sha256(lora_dir) and base.lora_sha256 == "none"

    out = tmp_path / "llm.safetensors"
    embed_catalog(base, prompts, out, progress=False)
    table = embed_catalog(merged, prompts, out, progress=False)  # another adapter: not reused
    assert read_table_metadata(out)["lora_sha256"] == lora_sha256(lora_dir)
    torch.testing.assert_close(table[1:7], e_merged, atol=1e-5, rtol=0)


def test_live_peft_model_is_hashed_not_called_base(llama_dir, lora_dir, prompts, tmp_path):
    from models.llm import load_lora

    emb = LLMEmbedder(LLMConfig(source=str(llama_dir), device="cpu"))
    emb.model = load_lora(emb.model, lora_dir)  # attached by hand, not by load_embedder
    embed_catalog(emb, prompts, tmp_path / "t.safetensors", progress=False)
    assert read_table_metadata(tmp_path / "t.safetensors")["lora_sha256"].startswith("live:")


def test_bad_arguments(embedder, prompts, tmp_path):
    with pytest.raises(ValueError, match="batch_size"):
        embed_catalog(embedder, prompts, tmp_path / "x.safetensors", batch_size=0)
    with pytest.raises(ValueError, match="no prompts"):
        embed_catalog(embedder, [], tmp_path / "x.safetensors")
