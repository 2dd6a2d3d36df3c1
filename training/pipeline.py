"""The whole LLMEmb method in one command: prepare -> SCFT -> embed -> PCA -> ID SASRec -> RAT -> evaluate -> export.

    llmemb pipeline --config configs/default.toml
    >>> from training.pipeline import load_config, run_pipeline
    >>> result = run_pipeline(load_config("configs/default.toml"))
    >>> result.bundle, result.records                              # bundle dir, results records (report.py)

Configuration: a TOML file with one table per stage (every key is listed and explained in configs/default.toml):

  [run]       root (where stage dirs go), seeds, device, progress
  [data]      dataset (name or path), format, user_core, item_core, max_users, cache_dir
  [llm]       models.llm.LLMConfig fields but device: source, max_length, dtype, pooling, cache_dir,
              attn_implementation
  [prompt]    instruction (default: the dataset's), max_value_chars
  [scft]      enabled + training.scft.SCFTConfig fields (max_steps, batch_size, lr, loss_form, ...);
              [scft.lora] models.llm.LoraSettings fields, [scft.views] models.prompts.ViewConfig fields
  [embed]     batch_size
  [pca]       d_m
  [srs]       training.srs.SRSTrainConfig fields (hidden, max_len, lr, max_epochs, patience, ...), shared by the
              ID-SASRec (the alignment target and the "None" row) and the RAT backbone
  [rat]       backbone, label + training.rat.RATConfig fields (method, alpha, gamma, gate, ...)
  [evaluate]  results (a results.json to merge the records into)
  [export]    enabled, artifacts, seed, set_current

Unknown tables or keys are refused with the list of valid ones; values are checked by the dataclasses they feed.
`overrides` ({"scft.max_steps": 5}, `--set scft.max_steps=5` on the command line) replace single keys.

Run directory. Every stage writes into `<run.root>/<dataset>/<stage>-<key>/` where key is the first 12 hex
digits of a sha256 over the stage's own config and the keys of every stage it reads from, so changing a setting
re-runs that stage and everything downstream and nothing else. A stage (or, for the per-seed stages ID SASRec and
RAT, a seed) is done when its `stage.json` exists; a later run with the same config skips it and does no training.
`stage.json` is written last, atomically, so an interrupted stage simply runs again (SCFT resumes from its newest
checkpoint when `scft.checkpoint_every` is set). Keys also include the device type (CPU and CUDA runs give
different numbers) but not settings that cannot change a result (embed batch size: the table is batch-size
invariant; progress bars). The prepare stage's key is the prepared dataset's cache key (source files, format,
k-core), so editing the data re-runs everything.

What each stage writes:
  prepare/   stats.json (the prepared dataset itself lives in the data cache, training/split.py)
  scft/      lora/ (peft adapter), scft.json (loss history, retrieval probe before / after)
  embed/     llm.safetensors (the catalog table, (n_items + 1, d_llm), row 0 zeros; metadata names model, LoRA,
             prompts and the prompt config)
  pca/       pca.safetensors (fitted on rows 1..n of the table)
  id/        seed<N>/ ID-SASRec checkpoint + metrics.json (the alignment target ẽ, and the "None" baseline)
  rat/       seed<N>/ RAT checkpoint in inference form + pca + adapter + rat.json + metrics.json
  evaluate/  results.json (records of training/report.py: None and the RAT method, every seed, both protocols)
  export/    stage.json naming the bundle written to `<export.artifacts>/bundles/<id>` (CURRENT set to it)
`llmemb report collect <root>` also reads the metrics.json files of the id/ and rat/ stages.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - python 3.10
    import tomli as tomllib

import torch

from models.io import atomic_write_text
from models.llm import LLMConfig, LoraSettings
from models.prompts import PromptConfig, ViewConfig
from models.srs import BACKBONES
from training.data.dataset import PreparedDataset
from training.rat import METHODS, RATConfig
from training.scft import SCFTConfig
from training.split import SplitConfig
from training.srs import SRSTrainConfig

log = logging.getLogger(__name__)

STAGES = ("prepare", "scft", "embed", "pca", "id", "rat", "evaluate", "export")
STAGE_VERSION = 1  # bump when a stage's outputs change meaning: every stage then runs again
MARKER = "stage.json"
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "default.toml"


class ConfigError(ValueError):
    """A pipeline config that cannot be used; the message names the file, table and key."""


# ---- configuration -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunSection:
    root: str = "runs/pipeline"
    seeds: tuple[int, ...] = (42,)
    device: str = "auto"  # auto | cpu | cuda[:N]: LLM stages and SRS training
    progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be a non-empty list of distinct integers, got {list(self.seeds)}")
        if self.device != "auto":
            torch.device(self.device)


@dataclass(frozen=True)
class DataSection:
    dataset: str = "ml-100k"
    format: str | None = None
    user_core: int = 5
    item_core: int = 5
    max_users: int | None = None
    cache_dir: str | None = None  # None: <data root>/cache

    def split(self) -> SplitConfig:
        return SplitConfig(user_core=self.user_core, item_core=self.item_core, max_users=self.max_users)


@dataclass(frozen=True)
class PromptSection:
    instruction: str | None = None  # None: the dataset's own instruction
    max_value_chars: int = 200


@dataclass(frozen=True)
class EmbedSection:
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class PcaSection:
    d_m: int | None = None  # None: min(1536, d_llm, n_items)


@dataclass(frozen=True)
class EvaluateSection:
    results: str | None = None  # merge the records into this results.json (e.g. docs/results.json)


@dataclass(frozen=True)
class ExportSection:
    enabled: bool = True
    artifacts: str = "artifacts"
    seed: int | None = None  # which seed's RAT run becomes the bundle; None: the first of run.seeds
    set_current: bool = True


# Fields of the library configs that the pipeline sets itself (they are not keys of their tables).
_SCFT_OWN = (
    "llm",
    "lora",
    "views",
    "instruction",
    "max_value_chars",
    "out_dir",
    "items",
    "resume",
    "progress",
)
_SRS_OWN = ("backbone", "seed", "dataset", "device")
_RAT_OWN = ("srs", "d_m")


@dataclass(frozen=True)
class PipelineConfig:
    run: RunSection = field(default_factory=RunSection)
    data: DataSection = field(default_factory=DataSection)
    llm: LLMConfig = field(default_factory=LLMConfig)
    prompt: PromptSection = field(default_factory=PromptSection)
    scft_enabled: bool = True
    scft: dict[str, Any] = field(default_factory=dict)  # SCFTConfig kwargs (+ "lora", "views" sub-tables)
    embed: EmbedSection = field(default_factory=EmbedSection)
    pca: PcaSection = field(default_factory=PcaSection)
    srs: dict[str, Any] = field(default_factory=dict)  # SRSTrainConfig kwargs
    rat_backbone: str = "sasrec"
    rat_label: str | None = None
    rat: dict[str, Any] = field(default_factory=dict)  # RATConfig kwargs
    evaluate: EvaluateSection = field(default_factory=EvaluateSection)
    export: ExportSection = field(default_factory=ExportSection)
    source: str = "<defaults>"  # the file it was read from, for messages

    # ---- the library configs it stands for ----
    @property
    def device(self) -> str:
        return self.run.device

    def llm_config(self) -> LLMConfig:
        return dataclasses.replace(self.llm, device=None if self.device == "auto" else self.device)

    def scft_config(self, out_dir: str | Path = "") -> SCFTConfig:
        kw = dict(self.scft)
        lora = kw.pop("lora", {})
        if isinstance(lora.get("target_modules"), list):
            lora = {**lora, "target_modules": tuple(lora["target_modules"])}
        views = kw.pop("views", {})
        return SCFTConfig(
            llm=self.llm_config(),
            lora=LoraSettings(**lora),
            views=ViewConfig(**views),
            instruction=self.prompt.instruction,
            max_value_chars=self.prompt.max_value_chars,
            out_dir=str(out_dir),
            resume=True,  # an interrupted SCFT stage continues from its newest checkpoint
            progress=self.run.progress,
            **kw,
        )

    def prompt_config(self, data: PreparedDataset) -> PromptConfig:
        return self.scft_config().prompt_config(data)

    def srs_config(self, seed: int, backbone: str = "sasrec") -> SRSTrainConfig:
        return SRSTrainConfig(backbone=backbone, seed=seed, device=self.device, **self.srs)

    def rat_config(self, seed: int) -> RATConfig:
        return RATConfig(srs=self.srs_config(seed, self.rat_backbone), d_m=self.pca.d_m, **self.rat)

    @property
    def method(self) -> str:
        return self.rat.get("method", RATConfig.method)

    @property
    def label(self) -> str:
        return self.rat_label or self.method

    @property
    def export_seed(self) -> int:
        return self.export.seed if self.export.seed is not None else self.run.seeds[0]

    def as_dict(self) -> dict[str, Any]:
        """The config as TOML-shaped tables (for the manifest and the run records)."""
        return {
            "run": dataclasses.asdict(self.run),
            "data": dataclasses.asdict(self.data),
            "llm": dataclasses.asdict(self.llm),
            "prompt": dataclasses.asdict(self.prompt),
            "scft": {"enabled": self.scft_enabled, **self.scft},
            "embed": dataclasses.asdict(self.embed),
            "pca": dataclasses.asdict(self.pca),
            "srs": dict(self.srs),
            "rat": {"backbone": self.rat_backbone, "label": self.rat_label, **self.rat},
            "evaluate": dataclasses.asdict(self.evaluate),
            "export": dataclasses.asdict(self.export),
        }


def _fields(cls, drop: Sequence[str] = ()) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.name not in drop]


# table -> the keys it accepts (sub-tables handled separately)
_KEYS: dict[str, list[str]] = {
    "run": _fields(RunSection),
    "data": _fields(DataSection),
    "llm": _fields(LLMConfig, ("device",)),
    "prompt": _fields(PromptSection),
    "scft": ["enabled", *_fields(SCFTConfig, _SCFT_OWN), "lora", "views"],
    "scft.lora": _fields(LoraSettings),
    "scft.views": _fields(ViewConfig),
    "embed": _fields(EmbedSection),
    "pca": _fields(PcaSection),
    "srs": _fields(SRSTrainConfig, _SRS_OWN),
    "rat": ["backbone", "label", *_fields(RATConfig, _RAT_OWN)],
    "evaluate": _fields(EvaluateSection),
    "export": _fields(ExportSection),
}


def _check_keys(where: str, table: str, raw: Any) -> dict[str, Any]:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: [{table}] must be a table, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(_KEYS[table]))
    if unknown:
        raise ConfigError(
            f"{where}: [{table}] has unknown key(s) {unknown}; valid keys: {', '.join(_KEYS[table])}"
        )
    return dict(raw)


def _build(where: str, table: str, factory: Callable[..., Any], kw: Mapping[str, Any]) -> Any:
    try:
        return factory(**kw)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: [{table}]: {e}") from e


def config_from_dict(raw: Mapping[str, Any], source: str = "<dict>") -> PipelineConfig:
    """Validate TOML-shaped tables into a PipelineConfig; every check runs now, before any stage does."""
    unknown = sorted(set(raw) - {t for t in _KEYS if "." not in t})
    if unknown:
        valid = ", ".join(t for t in _KEYS if "." not in t)
        raise ConfigError(f"{source}: unknown table(s) {unknown}; valid tables: {valid}")
    t = {name: _check_keys(source, name, raw.get(name, {})) for name in _KEYS if "." not in name}
    scft = t["scft"]
    for sub in ("lora", "views"):
        if sub in scft:
            scft[sub] = _check_keys(source, f"scft.{sub}", scft[sub])
    scft_enabled = bool(scft.pop("enabled", True))
    rat = t["rat"]
    backbone = rat.pop("backbone", "sasrec")
    label = rat.pop("label", None)
    if backbone not in BACKBONES:
        raise ConfigError(f"{source}: [rat] backbone must be one of {sorted(BACKBONES)}, got {backbone!r}")
    method = rat.get("method", RATConfig.method)
    if method not in METHODS:
        raise ConfigError(f"{source}: [rat] method must be one of {list(METHODS)}, got {method!r}")
    if method == "None":
        raise ConfigError(
            f"{source}: [rat] method 'None' is the ID-SASRec stage itself: pick an LLM method "
            "(e.g. 'LLMEmb+gatedID'), or run `llmemb train srs`"
        )
    cfg = PipelineConfig(
        run=_build(source, "run", RunSection, t["run"]),
        data=_build(source, "data", DataSection, t["data"]),
        llm=_build(source, "llm", LLMConfig, t["llm"]),
        prompt=_build(source, "prompt", PromptSection, t["prompt"]),
        scft_enabled=scft_enabled,
        scft=scft,
        embed=_build(source, "embed", EmbedSection, t["embed"]),
        pca=_build(source, "pca", PcaSection, t["pca"]),
        srs=t["srs"],
        rat_backbone=backbone,
        rat_label=label,
        rat=rat,
        evaluate=_build(source, "evaluate", EvaluateSection, t["evaluate"]),
        export=_build(source, "export", ExportSection, t["export"]),
        source=source,
    )
    # the library configs validate their own values: build each once now
    _build(source, "data", cfg.data.split, {})
    _build(source, "scft", cfg.scft_config, {})
    _build(source, "srs", cfg.srs_config, {"seed": cfg.run.seeds[0]})
    _build(source, "rat", cfg.rat_config, {"seed": cfg.run.seeds[0]})
    if cfg.export.seed is not None and cfg.export.seed not in cfg.run.seeds:
        raise ConfigError(
            f"{source}: [export] seed {cfg.export.seed} is not one of [run] seeds {list(cfg.run.seeds)}"
        )
    return cfg


def parse_override(text: str) -> tuple[str, Any]:
    """'scft.max_steps=5' -> ('scft.max_steps', 5); the value is read as TOML, else taken as a string."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key or "." not in key:
        raise ConfigError(f"override {text!r}: expected TABLE.KEY=VALUE, e.g. scft.max_steps=5")
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()
    return key, parsed


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> PipelineConfig:
    """Read a pipeline TOML (default: configs/default.toml) and apply `overrides` {"table.key": value}."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist (see configs/ for examples)") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e
    for dotted, value in (overrides or {}).items():
        *tables, key = dotted.split(".")
        node = raw
        for name in tables:
            node = node.setdefault(name, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {dotted!r}: {name!r} is not a table")
        node[key] = value
    return config_from_dict(raw, str(path))


# ---- stage bookkeeping ---------------------------------------------------------------------------------------
def stage_key(stage: str, config: Any, upstream: Sequence[str]) -> str:
    """sha256 over a stage's config and its upstream stages' keys (hex)."""
    payload = {"stage": stage, "version": STAGE_VERSION, "config": config, "upstream": list(upstream)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _device_type(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device).type


def _read_marker(d: Path, key: str) -> dict | None:
    try:
        m = json.loads((d / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return m if m.get("key") == key else None


def _write_marker(d: Path, stage: str, key: str, config: Any, upstream: Sequence[str], **extra: Any) -> None:
    doc = {"stage": stage, "key": key, "config": config, "upstream": list(upstream), **extra}
    atomic_write_text(d / MARKER, json.dumps(doc, indent=1, sort_keys=True, default=str) + "\n")


@dataclass
class StageInfo:
    name: str
    status: str  # "ran" | "skipped" | "off"
    dir: Path | None = None
    key: str | None = None
    wall_s: float = 0.0
    cpu_s: float = 0.0  # this process's CPU time (all threads)
    detail: str = ""


@dataclass
class PipelineResult:
    config: PipelineConfig
    data: PreparedDataset
    stages: list[StageInfo]
    records: list[dict]  # training/report.results_records of None and the RAT method
    per_seed: dict[str, dict[int, dict]]  # method label -> seed -> test metrics
    bundle: Path | None
    run_dir: Path

    def stage(self, name: str) -> StageInfo:
        return next(s for s in self.stages if s.name == name)

    @property
    def trained(self) -> list[str]:
        """Stages that did work in this run."""
        return [s.name for s in self.stages if s.status == "ran"]


class _Clock:
    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def done(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


# ---- the pipeline ----------------------------------------------------------------------------------------------
class Pipeline:
    """Runs the stages in order; `run()` returns a PipelineResult. `say` receives one line per stage."""

    def __init__(self, cfg: PipelineConfig, say: Callable[[str], None] = print) -> None:
        self.cfg, self.say = cfg, say
        self.device_type = _device_type(cfg.device)
        self.stages: list[StageInfo] = []
        self.root = Path(cfg.run.root)  # + /<dataset name>, set by the prepare stage
        self.embedder = None  # the LLM, kept from SCFT to the embed stage when both run

    # -- helpers --
    def _stage_dir(self, stage: str, key: str) -> Path:
        return self.root / f"{stage}-{key[:12]}"

    def _record(self, info: StageInfo, clock: _Clock) -> StageInfo:
        info.wall_s, info.cpu_s = clock.done()
        self.stages.append(info)
        n = STAGES.index(info.name) + 1
        where = f" -> {info.dir}" if info.dir else ""
        timing = f" in {info.wall_s:.1f} s (cpu {info.cpu_s:.1f} s)" if info.status == "ran" else ""
        detail = f" [{info.detail}]" if info.detail else ""
        self.say(f"[{n}/{len(STAGES)}] {info.name}: {info.status}{timing}{detail}{where}")
        return info

    @property
    def llm_name(self) -> str:
        source = self.cfg.llm.source
        name = Path(source).name if ("/" in source or source.endswith(".gguf")) else source
        return name + ("+scft" if self.cfg.scft_enabled else "")

    # -- stages --
    def prepare(self) -> PreparedDataset:
        from training.split import format_stats, prepare

        clock = _Clock()
        c = self.cfg.data
        data = prepare(c.dataset, c.split(), cache_dir=c.cache_dir, fmt=c.format)
        self.root = Path(self.cfg.run.root) / data.name
        conf = {"cache_key": data.config.get("cache_key"), "split": dataclasses.asdict(c.split())}
        key = stage_key("prepare", conf, [])
        d = self._stage_dir("prepare", key)
        status = "skipped" if _read_marker(d, key) else "ran"
        if status == "ran":
            d.mkdir(parents=True, exist_ok=True)
            atomic_write_text(d / "stats.json", json.dumps(data.stats, indent=1, default=str) + "\n")
            _write_marker(d, "prepare", key, conf, [])
            self.say(format_stats(data.stats))
        detail = f"{data.n_users} users, {data.n_items} items"
        self.prepare_info = self._record(StageInfo("prepare", status, d, key, detail=detail), clock)
        return data

    def scft(self, data: PreparedDataset) -> Path | None:
        from training.scft import fingerprint
        from training.scft import main as scft_main

        clock = _Clock()
        if not self.cfg.scft_enabled:
            self.scft_info = self._record(StageInfo("scft", "off", detail="[scft] enabled = false"), clock)
            return None
        cfg = self.cfg.scft_config()
        conf = {"fingerprint": fingerprint(cfg, data), "device": self.device_type}
        key = stage_key("scft", conf, [self.prepare_info.key])
        d = self._stage_dir("scft", key)
        status = "skipped" if _read_marker(d, key) else "ran"
        lora = d / "lora"
        if status == "ran":
            from models.llm import LLMEmbedder

            self.embedder = LLMEmbedder(cfg.llm)
            lora = scft_main(dataclasses.replace(cfg, out_dir=str(d)), data, embedder=self.embedder)
            _write_marker(d, "scft", key, conf, [self.prepare_info.key], config_full=dataclasses.asdict(cfg))
        summary = json.loads((d / "scft.json").read_text(encoding="utf-8"))
        probe = (summary.get("probe") or {}).get("after")
        detail = f"{summary.get('steps')} steps, final loss {summary.get('final_loss')}"
        if summary.get("final_loss") is not None:
            detail = f"{summary['steps']} steps, final loss {summary['final_loss']:.4f}"
        if probe:
            detail += f", probe top-1 {summary['probe']['before']['top1']:.3f} -> {probe['top1']:.3f}"
        self.scft_info = self._record(StageInfo("scft", status, d, key, detail=detail), clock)
        return lora

    def embed(self, data: PreparedDataset, lora: Path | None) -> Path:
        from training.embed import (
            catalog_prompts,
            embed_catalog,
            load_embedder,
            prompt_metadata,
            source_sha256,
        )

        clock = _Clock()
        llm_cfg = self.cfg.llm_config()
        prompt_cfg = self.cfg.prompt_config(data)
        llm_conf = {k: v for k, v in dataclasses.asdict(llm_cfg).items() if k not in ("cache_dir", "device")}
        conf = {
            "llm": llm_conf,
            "base_sha256": source_sha256(llm_cfg),
            "prompt": dataclasses.asdict(prompt_cfg),
            "device": self.device_type,
        }
        upstream = [self.prepare_info.key, self.scft_info.key or "no-scft"]
        key = stage_key("embed", conf, upstream)
        d = self._stage_dir("embed", key)
        path = d / "llm.safetensors"
        status = "skipped" if _read_marker(d, key) and path.is_file() else "ran"
        if status == "ran":
            from models.llm import merge_lora

            if self.embedder is not None:  # SCFT just ran: its model carries the adapter; fold it in
                self.embedder.model = merge_lora(self.embedder.model).eval()
            else:
                self.embedder = load_embedder(llm_cfg, lora)
            embed_catalog(
                self.embedder,
                catalog_prompts(data, prompt_cfg),
                path,
                batch_size=self.cfg.embed.batch_size,
                progress=self.cfg.run.progress,
                extra_metadata=prompt_metadata(prompt_cfg),
            )
            _write_marker(d, "embed", key, conf, upstream)
        self.embedder = None  # free the LLM before the SRS stages
        self.embed_info = self._record(StageInfo("embed", status, d, key), clock)
        return path

    def pca(self, data: PreparedDataset, table_path: Path) -> Path:
        from models.pca import PCA
        from training.embed import load_table, read_table_metadata
        from training.rat import pca_size

        clock = _Clock()
        d_llm = int(read_table_metadata(table_path)["dim"])
        k = pca_size(self.cfg.rat_config(self.cfg.run.seeds[0]), d_llm, data.n_items)
        conf = {"k": k}
        key = stage_key("pca", conf, [self.embed_info.key])
        d = self._stage_dir("pca", key)
        path = d / "pca.safetensors"
        status = "skipped" if _read_marker(d, key) and path.is_file() else "ran"
        if status == "ran":
            d.mkdir(parents=True, exist_ok=True)
            pca = PCA.fit(load_table(table_path)[1:].float(), k)
            pca.save(path)
            ratio = pca.explained_variance_ratio
            _write_marker(
                d, "pca", key, conf, [self.embed_info.key], explained_variance_ratio=float(ratio.sum())
            )
        kept = json.loads((d / MARKER).read_text())["explained_variance_ratio"]
        self.pca_info = self._record(
            StageInfo("pca", status, d, key, detail=f"{d_llm} -> {k}, keeps {kept:.1%}"), clock
        )
        return path

    def _per_seed(
        self, stage: str, conf: dict, upstream: list[str], train: Callable[[int, Path], None]
    ) -> StageInfo:
        clock = _Clock()
        key = stage_key(stage, conf, upstream)
        d = self._stage_dir(stage, key)
        ran = []
        for seed in self.cfg.run.seeds:
            sd = d / f"seed{seed}"
            if _read_marker(sd, key):
                continue
            train(seed, sd)
            _write_marker(sd, stage, key, conf, upstream, seed=seed)
            ran.append(seed)
        status = "ran" if ran else "skipped"
        detail = f"seeds {list(self.cfg.run.seeds)}" + (
            f", trained {ran}" if ran and len(ran) < len(self.cfg.run.seeds) else ""
        )
        return self._record(StageInfo(stage, status, d, key, detail=detail), clock)

    def id_sasrec(self, data: PreparedDataset) -> None:
        from training.cli import write_run_metrics
        from training.srs import main as srs_main
        from training.srs import save_checkpoint

        srs = self.cfg.srs_config(seed=0)
        conf = {
            "srs": {k: v for k, v in dataclasses.asdict(srs).items() if k != "seed"},
            "device": self.device_type,
        }

        def train(seed: int, out: Path) -> None:
            cfg = self.cfg.srs_config(seed)
            result = srs_main(cfg, data)
            save_checkpoint(result.model, cfg, out, data=data)
            write_run_metrics(out, data.name, "sasrec", "None", None, seed, result)

        self.id_info = self._per_seed("id", conf, [self.prepare_info.key], train)

    def rat(self, data: PreparedDataset, table_path: Path, pca_path: Path) -> None:
        from models.pca import PCA
        from training.cli import write_run_metrics
        from training.embed import load_table
        from training.rat import load_id_table, save_rat
        from training.rat import main as rat_main

        rat = self.cfg.rat_config(seed=0)
        rat_conf = dataclasses.asdict(rat)
        rat_conf["srs"].pop("seed")
        conf = {"rat": rat_conf, "label": self.cfg.label, "device": self.device_type}
        upstream = [self.prepare_info.key, self.embed_info.key, self.pca_info.key]
        if rat.effective_alpha > 0:
            upstream.append(self.id_info.key)
        llm_table, pca = load_table(table_path), PCA.load(pca_path)

        def train(seed: int, out: Path) -> None:
            cfg = self.cfg.rat_config(seed)
            id_table = load_id_table(self.id_info.dir / f"seed{seed}") if cfg.effective_alpha > 0 else None
            result = rat_main(cfg, data, llm_table, id_table, pca=pca)
            save_rat(result, out, data=data, llm=self.llm_name)
            write_run_metrics(
                out, data.name, self.cfg.rat_backbone, self.cfg.label, self.llm_name, seed, result
            )

        self.rat_info = self._per_seed("rat", conf, upstream, train)

    def evaluate(self, data: PreparedDataset) -> tuple[list[dict], dict[str, dict[int, dict]]]:
        """Reload every seed's saved ID-SASRec and RAT models and evaluate them on test (the saved inference form
        is what gets reported, and what export ships)."""
        from training.evaluate import EvalConfig, Evaluator
        from training.report import git_commit, results_records
        from training.srs import load_checkpoint, resolve_device

        clock = _Clock()
        conf = {"seeds": list(self.cfg.run.seeds), "eval": dataclasses.asdict(EvalConfig())}
        upstream = [self.id_info.key, self.rat_info.key]
        key = stage_key("evaluate", conf, upstream)
        d = self._stage_dir("evaluate", key)
        status = "skipped" if _read_marker(d, key) and (d / "per_seed.json").is_file() else "ran"
        rows = (
            ("None", None, "sasrec", self.id_info.dir),
            (self.cfg.label, self.llm_name, self.cfg.rat_backbone, self.rat_info.dir),
        )
        if status == "ran":
            device = str(resolve_device(self.cfg.device))
            per_seed: dict[str, dict[int, dict]] = {}
            for label, _, _, run in rows:
                for seed in self.cfg.run.seeds:
                    model, _ = load_checkpoint(run / f"seed{seed}", device=device)
                    with torch.no_grad():
                        per_seed.setdefault(label, {})[seed] = Evaluator(data, seed).evaluate(model, "test")
            from training.export import _json_safe

            d.mkdir(parents=True, exist_ok=True)
            atomic_write_text(d / "per_seed.json", json.dumps(_json_safe(per_seed), indent=1) + "\n")
            commit = git_commit()
            records = [
                r
                for label, llm, backbone, _ in rows
                for r in results_records(data.name, backbone, label, llm, per_seed[label], commit)
            ]
            atomic_write_text(d / "results.json", json.dumps(_json_safe(records), indent=1) + "\n")
            _write_marker(d, "evaluate", key, conf, upstream)
        per_seed = {
            label: {int(s): m for s, m in v.items()}
            for label, v in json.loads((d / "per_seed.json").read_text(encoding="utf-8")).items()
        }
        records = json.loads((d / "results.json").read_text(encoding="utf-8"))
        if self.cfg.evaluate.results:
            from training.report import merge_records

            merge_records(self.cfg.evaluate.results, records)
        self.eval_info = self._record(StageInfo("evaluate", status, d, key), clock)
        return records, per_seed

    def export(self, data: PreparedDataset, table_path: Path, lora: Path | None) -> Path | None:
        from models.bundle import current_bundle_id, set_current_bundle
        from training.export import export_bundle

        clock = _Clock()
        e = self.cfg.export
        if not e.enabled:
            self._record(StageInfo("export", "off", detail="[export] enabled = false"), clock)
            return None
        artifacts = Path(e.artifacts)
        conf = {"artifacts": str(artifacts.resolve()), "seed": self.cfg.export_seed}
        upstream = [
            self.embed_info.key,
            self.scft_info.key or "no-scft",
            self.rat_info.key,
            self.eval_info.key,
        ]
        key = stage_key("export", conf, upstream)
        d = self._stage_dir("export", key)
        marker = _read_marker(d, key)
        bundle = Path(marker["bundle"]) if marker else None
        if bundle is not None and (bundle / "manifest.json").is_file():
            status = "skipped"
            if e.set_current and current_bundle_id(artifacts) != bundle.name:
                set_current_bundle(artifacts, bundle.name)
        else:
            status = "ran"
            stage_keys = {s.name: s.key for s in self.stages if s.key}
            bundle = export_bundle(
                artifacts,
                data,
                self.rat_info.dir / f"seed{self.cfg.export_seed}",
                table_path,
                lora_dir=lora,
                training={
                    "pipeline": {
                        "config": self.cfg.as_dict(),
                        "source": self.cfg.source,
                        "stages": stage_keys,
                    }
                },
                set_current=e.set_current,
            )
            d.mkdir(parents=True, exist_ok=True)
            _write_marker(d, "export", key, conf, upstream, bundle=str(bundle.resolve()))
        self._record(StageInfo("export", status, d, key, detail=f"bundle {bundle.name}"), clock)
        return bundle

    def run(self) -> PipelineResult:
        data = self.prepare()
        lora = self.scft(data)
        table = self.embed(data, lora)
        pca = self.pca(data, table)
        self.id_sasrec(data)
        self.rat(data, table, pca)
        records, per_seed = self.evaluate(data)
        bundle = self.export(data, table, lora)
        return PipelineResult(self.cfg, data, self.stages, records, per_seed, bundle, self.root)


def run_pipeline(cfg: PipelineConfig, say: Callable[[str], None] = print) -> PipelineResult:
    """Run (or resume) the pipeline of `cfg`; stages already done for the same config are skipped."""
    return Pipeline(cfg, say).run()


def timing_table(stages: Sequence[StageInfo]) -> str:
    """A markdown table of the stages' status and wall / CPU seconds."""
    lines = ["| stage | status | wall s | cpu s |", "|---|---|---:|---:|"]
    for s in stages:
        lines.append(f"| {s.name} | {s.status} | {s.wall_s:.1f} | {s.cpu_s:.1f} |")
    total_w, total_c = sum(s.wall_s for s in stages), sum(s.cpu_s for s in stages)
    lines.append(f"| total | | {total_w:.1f} | {total_c:.1f} |")
    return "\n".join(lines) + "\n"
