"""training/rat.py + models/residual.py: every method end to end, what is frozen, the alignment term, the LLM2X
init, the popularity gate, the export to a frozen table, the aux-loss hook of srs.main, and `llmemb train rat`."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from models.adapter import AdaptedTableEncoder
from models.pca import PCA
from models.residual import GateConfig, PopularityGate, ResidualAdaptedEncoder
from models.srs import FrozenTableEncoder, IDEncoder, build_backbone, pad_left
from tests.tiny_llm import walk_dataset
from training.data.dataset import PreparedDataset
from training.rat import (
    METHODS,
    RATAuxLoss,
    RATConfig,
    batch_items,
    build_item_encoder,
    final_item_table,
    gate_scale_for,
    load_id_table,
    main,
    method_slug,
    pca_size,
    pca_table,
    save_rat,
)
from training.srs import SRSTrainConfig, TrainBatches, load_checkpoint, save_checkpoint
from training.srs import main as srs_main

N_ITEMS = 150  # the evaluator's sampled protocol needs >= 100 unseen items per user
D_LLM = 32
TINY = SRSTrainConfig(
    max_epochs=1, batch_size=16, hidden=16, n_layers=1, n_heads=2, dropout=0.1, max_len=12, device="cpu"
)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data() -> PreparedDataset:
    """60 users walking the catalog (item i followed by i + 1); items 141..150 never appear (zero count)."""
    return walk_dataset(N_ITEMS, start_below=130, lengths=(5, 11))


@pytest.fixture(scope="module")
def llm_table() -> torch.Tensor:
    t = torch.randn(N_ITEMS + 1, D_LLM, generator=torch.Generator().manual_seed(1)) + 3.0  # off-centre
    t[0] = 0
    return t


@pytest.fixture(scope="module")
def id_table() -> torch.Tensor:
    t = torch.randn(N_ITEMS + 1, TINY.hidden, generator=torch.Generator().manual_seed(2))
    t[0] = 0
    return t


def first_batch(data: PreparedDataset, cfg: SRSTrainConfig = TINY) -> dict[str, torch.Tensor]:
    return next(iter(TrainBatches(data, "next", cfg, np.random.default_rng(0))))


def test_config_validates() -> None:
    with pytest.raises(ValueError, match="method"):
        RATConfig(method="LLMEmb w/o everything")
    with pytest.raises(ValueError, match="gamma"):
        RATConfig(gamma=0)
    with pytest.raises(ValueError, match="alpha"):
        RATConfig(alpha=-1)
    with pytest.raises(ValueError, match="align_form"):
        RATConfig(align_form="cosine")
    with pytest.raises(ValueError, match="gate"):
        RATConfig(gate="none")
    with pytest.raises(ValueError, match="d_m"):
        RATConfig(d_m=0)
    with pytest.raises(ValueError, match="exceeds"):
        RATConfig(d_m=64).resolve_d_m(d_llm=32, n_items=100)
    assert RATConfig().resolve_d_m(d_llm=4096, n_items=10_000) == 1536  # the paper's size
    assert RATConfig().resolve_d_m(d_llm=384, n_items=10_000) == 384  # capped by a small LLM
    assert RATConfig(method="LLMEmb w/o align").effective_alpha == 0.0
    assert RATConfig(method="LLMEmb w/o adapter").effective_alpha == 0.0  # nothing trainable to align
    assert RATConfig(method="LLMEmb").effective_alpha == 0.01


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_end_to_end(method, data, llm_table, id_table, tmp_path) -> None:
    cfg = RATConfig(srs=TINY, method=method)
    res = main(cfg, data, llm_table, id_table)
    assert len(res.history) == 1 and np.isfinite(res.history[0]["loss"])
    assert ("aux" in res.history[0]) == (cfg.effective_alpha > 0)
    for protocol in ("sampled100", "full"):
        assert 0.0 <= res.test[protocol]["overall"]["N@10"] <= res.test[protocol]["overall"]["H@10"] <= 1.0
    assert (res.pca is None) == (method == "None")
    # The saved run restores, in inference form, to a model with exactly the trained model's scores.
    path = save_rat(res, tmp_path / method_slug(method), data=data, llm="random")
    model, cfg2 = load_checkpoint(path)
    assert cfg2 == TINY
    expected_encoder = IDEncoder if method in ("None", "LLM2X") else FrozenTableEncoder
    assert isinstance(model.item_encoder, expected_encoder)
    torch.testing.assert_close(model.item_table(), final_item_table(res.model), rtol=0, atol=0)
    seq = pad_left(data.split("test")[0][:16], TINY.max_len)
    with torch.no_grad():
        torch.testing.assert_close(
            model.score_all(model(seq)), res.model.score_all(res.model(seq)), rtol=1e-5, atol=1e-5
        )
    info = json.loads((path / "rat.json").read_text())
    assert info["method"] == method and info["rat_config"]["method"] == method
    if res.pca is not None:
        assert PCA.load(path / "pca.safetensors").k == res.pca.k
    assert (path / "adapter.safetensors").is_file() == hasattr(res.model.item_encoder, "adapter")


def test_frozen_table_gets_no_gradient_but_the_unfrozen_one_does(data, llm_table, id_table) -> None:
    batch = first_batch(data)
    for method, trainable in (("LLMEmb", False), ("LLMEmb w/o freeze", True)):
        cfg = RATConfig(srs=TINY, method=method)
        enc, _ = build_item_encoder(cfg, data, llm_table)
        assert isinstance(enc, AdaptedTableEncoder) and enc.trainable_table == trainable
        model = build_backbone("sasrec", TINY.srs_config(N_ITEMS), enc)
        (model.loss(batch) + RATAuxLoss(cfg, N_ITEMS, id_table)(model, batch)).backward()
        assert enc.weight.requires_grad == trainable
        if trainable:
            assert enc.weight.grad is not None and enc.weight.grad.abs().sum() > 0
        else:
            assert enc.weight.grad is None and "weight" not in dict(enc.named_parameters())
        assert enc.adapter.w2.weight.grad.abs().sum() > 0
    # After training, LLMEmb's table is still exactly the PCA'd LLM table.
    res = main(RATConfig(srs=TINY, method="LLMEmb", alpha=0.0), data, llm_table)
    expected, _ = pca_table(llm_table, D_LLM)
    torch.testing.assert_close(res.model.item_encoder.weight, expected, rtol=0, atol=0)


def aligned_step(data, llm_table, id_table):
    """A first training batch, an aligned LLMEmb config (alpha 0.5, gamma 0.2), its SASRec and its aux loss."""
    cfg = RATConfig(srs=TINY, method="LLMEmb", alpha=0.5, gamma=0.2)
    enc, _ = build_item_encoder(cfg, data, llm_table)
    model = build_backbone("sasrec", TINY.srs_config(N_ITEMS), enc)
    return first_batch(data), cfg, model, RATAuxLoss(cfg, N_ITEMS, id_table)


def test_alignment_term_weights_and_gradients(data, llm_table, id_table) -> None:
    batch, cfg, model, aux = aligned_step(data, llm_table, id_table)
    enc = model.item_encoder
    value = aux(model, batch)
    assert value.item() > 0 and value.item() == pytest.approx(0.5 * float(aux.last["align"]), rel=1e-6)
    value.backward()
    assert enc.adapter.w1.weight.grad.abs().sum() > 0 and enc.adapter.w2.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.stack.parameters())  # the alignment only reaches item vectors
    # The ID table is a fixed target, and the weight scales the term linearly.
    double = RATAuxLoss(replace(cfg, alpha=1.0), N_ITEMS, id_table)(model, batch)
    assert double.item() == pytest.approx(2 * value.item(), rel=1e-5)
    # w/o align: no aux term at all.
    off = RATAuxLoss(replace(cfg, method="LLMEmb w/o align"), N_ITEMS, id_table)
    assert not off.active and off(model, batch).item() == 0.0
    with pytest.raises(ValueError, match="id_table"):
        main(RATConfig(srs=TINY, method="LLMEmb"), data, llm_table, None)
    with pytest.raises(ValueError, match="shape"):
        main(RATConfig(srs=TINY, method="LLMEmb"), data, llm_table, id_table[:, :8])


def test_prepare_puts_the_distinct_items_into_the_host_batch(data, llm_table, id_table) -> None:
    batch, _, model, aux = aligned_step(data, llm_table, id_table)
    prepared = aux.prepare(batch)
    assert set(prepared) == set(batch) | {"align_items"}
    assert prepared["align_items"].tolist() == batch_items(batch, N_ITEMS).tolist()
    torch.testing.assert_close(aux(model, prepared), aux(model, batch), rtol=0, atol=0)


def test_batch_items_are_the_distinct_real_ids_of_the_sequences() -> None:
    batch = {
        "seq": torch.tensor([[0, 3, 4, 4], [0, 0, 9, 3]]),
        "pos": torch.tensor([[0, 4, 4, 5], [0, 0, 3, 7]]),
        "neg": torch.tensor(
            [[0, 11, 12, 13], [0, 0, 14, 15]]
        ),  # sampled negatives are not "items of the batch"
    }
    assert batch_items(batch, 20).tolist() == [3, 4, 5, 7, 9]
    cloze = {
        "seq": torch.tensor([[0, 21, 2]]),
        "labels": torch.tensor([[0, 6, 0]]),
    }  # 21 = [mask] of 20 items
    assert batch_items(cloze, 20).tolist() == [2, 6]


def test_llm2x_init_is_the_pca_projection(data, llm_table) -> None:
    enc, pca = build_item_encoder(RATConfig(srs=TINY, method="LLM2X"), data, llm_table)
    assert isinstance(enc, IDEncoder) and enc.embedding.weight.requires_grad
    direct = PCA.fit(llm_table[1:], TINY.hidden)
    torch.testing.assert_close(enc.embedding.weight[1:].detach(), direct.transform(llm_table[1:]))
    assert torch.equal(enc.embedding.weight[0].detach(), torch.zeros(TINY.hidden)) and pca.k == TINY.hidden
    frozen, _ = build_item_encoder(RATConfig(srs=TINY, method="LLMEmb w/o adapter"), data, llm_table)
    assert isinstance(frozen, FrozenTableEncoder)
    torch.testing.assert_close(frozen.weight, enc.embedding.weight.detach())


def test_a_prefitted_pca_gives_the_same_encoder(data, llm_table, tmp_path) -> None:
    """The pipeline fits the PCA in its own stage and hands it to RAT: same table as fitting inside."""
    for method in ("LLMEmb", "LLM2X"):
        cfg = RATConfig(srs=TINY, method=method, d_m=8)
        k = pca_size(cfg, D_LLM, N_ITEMS)
        assert k == (TINY.hidden if method == "LLM2X" else 8)
        PCA.fit(llm_table[1:], k).save(tmp_path / "pca.safetensors")
        fitted = PCA.load(tmp_path / "pca.safetensors")
        torch.manual_seed(0)  # the adapter's initialisation
        inside, _ = build_item_encoder(cfg, data, llm_table)
        torch.manual_seed(0)
        given, pca = build_item_encoder(cfg, data, llm_table, fitted)
        assert pca is fitted
        torch.testing.assert_close(given.table(), inside.table(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="the method needs 8 x 32"):
        build_item_encoder(
            RATConfig(srs=TINY, method="LLMEmb", d_m=8), data, llm_table, PCA.fit(llm_table[1:], 4)
        )


@pytest.mark.parametrize("kind", ["linear", "sigmoid"])
def test_gate_is_zero_for_unseen_items_and_saturates_for_popular_ones(kind) -> None:
    counts = torch.tensor([0, 0, 1, 5, 10, 50, 1000])
    gate = PopularityGate(counts, GateConfig(kind=kind, scale=10.0))
    g = gate().detach()
    assert g[0] == 0 and g[1] == 0  # padding; an item never seen in training
    assert torch.all(g[1:].diff() >= 0) and g[-1] > 0.99  # monotone in the count, ~1 for popular items
    assert g[4].item() == pytest.approx(1.0 if kind == "linear" else 0.5)
    torch.testing.assert_close(gate(torch.tensor([[3, 0], [6, 1]])), g[torch.tensor([[3, 0], [6, 1]])])
    assert torch.all(PopularityGate(counts, GateConfig(kind="none"))()[1:] == 1)
    if kind == "sigmoid":  # learnable, and the hard zero for unseen items survives any parameter value
        assert {n for n, _ in gate.named_parameters()} == {"log_slope", "mid"}
        with torch.no_grad():
            gate.mid.fill_(-5.0)
        assert gate()[1] == 0


def test_gated_residual_encoder(data, llm_table) -> None:
    cfg = RATConfig(srs=TINY, method="LLMEmb+gatedID", residual_init_std=0.1, gate="sigmoid")
    enc, _ = build_item_encoder(cfg, data, llm_table)
    assert isinstance(enc, ResidualAdaptedEncoder)
    counts = data.item_popularity()
    assert enc.gate.config.scale == gate_scale_for(counts) > 0
    enc.eval()
    ids = torch.tensor([[0, 1, 5], [140, 145, 150]])
    e = enc(ids)
    expected = enc.semantic(ids) + enc.residual(ids) * enc.gate(ids).unsqueeze(-1)
    torch.testing.assert_close(e, expected)
    torch.testing.assert_close(e, enc.table()[ids], rtol=1e-5, atol=1e-6)
    assert torch.equal(e[0, 0], torch.zeros(TINY.hidden))
    unseen = torch.tensor([i for i in range(1, N_ITEMS + 1) if counts[i] == 0])
    assert unseen.numel() > 0
    torch.testing.assert_close(enc(unseen), enc.semantic(unseen))  # zero-count items: purely semantic
    # The ungated variant starts at exactly the adapter (residual init 0) and has g = 1 everywhere.
    plain, _ = build_item_encoder(RATConfig(srs=TINY, method="LLMEmb+ID"), data, llm_table)
    torch.testing.assert_close(
        plain.table(), plain.adapter(plain.weight) * (torch.arange(N_ITEMS + 1) > 0)[:, None]
    )
    # Residual dropout only acts in training; the L2 term only sees the gated residual.
    enc.train()
    enc.dropout = 0.5
    assert not torch.equal(enc(torch.arange(1, 130)), enc(torch.arange(1, 130)))
    batch = first_batch(data)
    model = build_backbone("sasrec", TINY.srs_config(N_ITEMS), enc)
    aux = RATAuxLoss(replace(cfg, alpha=0.0, residual_l2=1.0), N_ITEMS, None)
    value = aux(model, batch)
    value.backward()
    assert value.item() > 0 and enc.residual.weight.grad.abs().sum() > 0
    assert enc.adapter.w1.weight.grad is None


def test_residual_can_start_at_the_llm2x_initialisation(data, llm_table) -> None:
    cfg = RATConfig(srs=TINY, method="LLMEmb+ID", residual_pca_init=True)
    torch.manual_seed(0)
    enc, pca = build_item_encoder(cfg, data, llm_table)
    expected, _ = pca_table(llm_table, TINY.hidden)
    torch.testing.assert_close(enc.residual.weight.detach(), expected, rtol=0, atol=0)
    assert pca.k == cfg.resolve_d_m(llm_table.shape[1], N_ITEMS)  # new items still go through the d_m PCA
    torch.manual_seed(0)
    plain, _ = build_item_encoder(replace(cfg, residual_pca_init=False), data, llm_table)
    ids = torch.arange(N_ITEMS + 1)
    torch.testing.assert_close(enc(ids) - plain(ids), expected, rtol=1e-5, atol=1e-5)  # same adapter init
    with pytest.raises(ValueError, match="hidden"):
        build_item_encoder(replace(cfg, srs=replace(TINY, hidden=llm_table.shape[1] * 2)), data, llm_table)


def test_residual_variant_trains_and_exports(data, llm_table, id_table, tmp_path) -> None:
    cfg = RATConfig(
        srs=replace(TINY, max_epochs=2), method="LLMEmb+gatedID", gate="sigmoid", residual_l2=1e-3
    )
    res = main(cfg, data, llm_table, id_table)
    enc = res.model.item_encoder
    assert enc.residual.weight[1:].abs().sum() > 0  # the residual moved
    counts = torch.from_numpy(data.item_popularity())
    assert torch.all(enc.residual_norms()[counts == 0] == 0)
    frozen = enc.to_frozen()
    torch.testing.assert_close(frozen.weight, final_item_table(res.model), rtol=0, atol=0)
    info = json.loads((save_rat(res, tmp_path / "gated", data=data) / "rat.json").read_text())
    assert info["mean_residual_norm"] > 0 and "sigmoid" in info["gate"]


def test_srs_main_aux_loss_hook(data) -> None:
    calls = []

    def shrink(model, batch):  # a huge L2 pull on the item vectors of the batch
        calls.append(set(batch))
        return 100.0 * model.item_encoder(batch_items(batch, N_ITEMS)).pow(2).sum(-1).mean()

    cfg = replace(TINY, max_epochs=2)
    plain = srs_main(cfg, data)
    pulled = srs_main(cfg, data, aux_loss=shrink)
    assert calls and calls[0] == {"seq", "pos", "neg", "tgt"}
    assert len(calls) == 2 * -(-data.n_users // cfg.batch_size)  # once per training step
    assert all("aux" in h and h["aux"] > 0 for h in pulled.history) and "aux" not in plain.history[0]
    seen = torch.from_numpy(data.item_popularity() > 0)
    with torch.no_grad():
        norm_pulled = pulled.model.item_table()[seen].norm(dim=1).mean()
        norm_plain = plain.model.item_table()[seen].norm(dim=1).mean()
    assert norm_pulled < 0.8 * norm_plain  # the hook's gradient reached the optimiser


def test_load_id_table_round_trips_a_checkpoint(data, tmp_path) -> None:
    res = srs_main(TINY, data)
    save_checkpoint(res.model, TINY, tmp_path / "id")
    torch.testing.assert_close(
        load_id_table(tmp_path / "id"), res.model.item_table().detach(), rtol=0, atol=0
    )


def test_method_slug() -> None:
    assert method_slug("LLMEmb w/o align") == "llmemb-wo-align"
    assert method_slug("LLMEmb+gatedID") == "llmemb-gatedid"
    assert len({method_slug(m) for m in METHODS}) == len(METHODS)


def test_cli_train_rat(tmp_path, canonical_dir) -> None:
    from safetensors.torch import save_file

    from llmemb.cli import main as cli_main
    from training.split import SplitConfig, prepare

    rows = ["user_id,item_id,timestamp"]
    rng = np.random.default_rng(3)
    for u in range(60):
        start = int(rng.integers(0, 120))
        rows += [f"u{u},i{start + t},{t}" for t in range(8)]
    ds = canonical_dir("\n".join(rows) + "\n", [{"item_id": f"i{i}", "title": f"t{i}"} for i in range(130)])
    prepared = prepare(str(ds), SplitConfig(user_core=3, item_core=1), cache_dir=str(tmp_path / "cache"))
    n = prepared.n_items
    assert n > 100
    table = torch.randn(n + 1, D_LLM)
    table[0] = 0
    save_file({"weight": table}, str(tmp_path / "llm.safetensors"), metadata={"model_source": "minilm"})
    common = [
        "--dataset", str(ds), "--user-core", "3", "--item-core", "1", "--cache-dir", str(tmp_path / "cache"),
        "--epochs", "1", "--hidden", "16", "--layers", "1", "--heads", "2", "--max-len", "8",
        "--batch-size", "16", "--device", "cpu", "--out", str(tmp_path / "runs"),
    ]  # fmt: skip
    assert cli_main(["train", "srs", *common]) == 0
    rc = cli_main(
        [
            "train",
            "rat",
            *common,
            "--method",
            "LLMEmb+gatedID",
            "--llm-table",
            str(tmp_path / "llm.safetensors"),
            "--residual-pca-init",
        ]
    )
    assert rc == 0
    run = tmp_path / "runs" / prepared.name / "sasrec" / "llmemb-gatedid-minilm" / "seed42"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["method"] == "LLMEmb+gatedID" and metrics["llm"] == "minilm"
    assert json.loads((run / "rat.json").read_text())["rat_config"]["residual_pca_init"] is True
    assert load_checkpoint(run)[0].item_table().shape == (n + 1, 16)
    with pytest.raises(SystemExit, match="ID checkpoint"):
        cli_main(
            ["train", "rat", *common, "--method", "LLMEmb", "--llm-table", str(tmp_path / "llm.safetensors"),
             "--id-checkpoint", str(tmp_path / "nowhere")]
        )  # fmt: skip

    # --loss ce (catalog softmax) reaches the checkpoints of both commands; --label names the ID variant
    ce = [*common[:-1], str(tmp_path / "ce"), "--loss", "ce"]
    assert cli_main(["train", "srs", *ce, "--label", "None (CE)"]) == 0
    id_run = tmp_path / "ce" / prepared.name / "sasrec" / "seed42"
    assert json.loads((id_run / "metrics.json").read_text())["method"] == "None (CE)"
    assert load_checkpoint(id_run)[0].config.loss == "ce"
    llm = str(tmp_path / "llm.safetensors")
    assert (
        cli_main(["train", "rat", *ce, "--method", "LLM2X", "--label", "LLM2X (CE)", "--llm-table", llm]) == 0
    )
    run = tmp_path / "ce" / prepared.name / "sasrec" / "llm2x-ce-minilm" / "seed42"
    assert json.loads((run / "rat.json").read_text())["rat_config"]["srs"]["loss"] == "ce"
    assert load_checkpoint(run)[0].config.loss == "ce"
