"""Build a dataset's raw and SCFT-tuned LLM item tables (the LLM stages of LLMEmb), on CUDA when present.

    python scripts/llm_tables.py --dataset ml-100k --llm smollm2 --out runs/llm/ml-100k --epochs 20

Writes OUT/llm_raw.safetensors (the general-purpose LLM: LLM2X and "w/o SCFT"), OUT/scft/ (LoRA adapter +
scft.json with the retrieval probe before/after) and OUT/llm_scft.safetensors (the fine-tuned LLM: LLMEmb).
Tables are (n_items + 1, d) float32, row 0 = padding; `--half-copy DIR` also writes float16 copies for transfer.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from models.llm import LLMConfig, LLMEmbedder, LoraSettings, merge_lora
from models.prompts import ViewConfig
from training.embed import catalog_prompts, embed_catalog
from training.scft import SCFTConfig
from training.scft import main as scft_main
from training.split import prepare


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, help="dataset name or path (see `llmemb data prepare`)")
    p.add_argument("--llm", default="smollm2", help="smollm2 | minilm | a local HF dir | a .gguf file")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--epochs", type=int, default=1, help="SCFT epochs over the catalog")
    p.add_argument("--max-steps", type=int, default=None, help="SCFT step cap (overrides epochs)")
    p.add_argument("--batch-size", type=int, default=32, help="SCFT items per step (two views each)")
    p.add_argument("--lr", type=float, default=2e-4, help="SCFT learning rate")
    p.add_argument("--lora-r", type=int, default=8, help="LoRA rank")
    p.add_argument(
        "--view-mode", default="auto", choices=["auto", "attr", "span"], help="SCFT view augmentation"
    )
    p.add_argument("--drop", type=float, default=0.2, help="drop ratio for attributes / word spans")
    p.add_argument("--max-length", type=int, default=64, help="prompt tokens kept")
    p.add_argument("--embed-batch", type=int, default=64, help="catalog embedding batch size")
    p.add_argument(
        "--half-copy", type=Path, default=None, help="also write float16 copies of the tables here"
    )
    args = p.parse_args()

    data = prepare(args.dataset)
    llm_cfg = LLMConfig(source=args.llm, max_length=args.max_length)
    scft_cfg = SCFTConfig(
        llm=llm_cfg,
        lora=LoraSettings(r=args.lora_r, alpha=2 * args.lora_r),
        views=ViewConfig(attr_drop=args.drop, span_drop=args.drop, mode=args.view_mode),
        batch_size=args.batch_size,
        lr=args.lr,
        epochs=args.epochs,
        max_steps=args.max_steps,
        out_dir=str(args.out / "scft"),
        probe_holdout=False,
    )
    prompts = catalog_prompts(data, scft_cfg.prompt_config(data))
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    embedder = LLMEmbedder(llm_cfg)
    timings = {"load_s": time.perf_counter() - t0}
    t0 = time.perf_counter()
    raw = embed_catalog(embedder, prompts, args.out / "llm_raw.safetensors", batch_size=args.embed_batch)
    timings["embed_raw_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    scft_main(scft_cfg, data, embedder=embedder)
    timings["scft_s"] = time.perf_counter() - t0
    embedder.model = merge_lora(embedder.model)
    t0 = time.perf_counter()
    tuned = embed_catalog(embedder, prompts, args.out / "llm_scft.safetensors", batch_size=args.embed_batch)
    timings["embed_scft_s"] = time.perf_counter() - t0
    if args.half_copy:
        args.half_copy.mkdir(parents=True, exist_ok=True)
        for name, t in (("llm_raw", raw), ("llm_scft", tuned)):
            save_file(
                {"weight": t.half().contiguous()}, str(args.half_copy / f"{data.name}-{name}.safetensors")
            )
    scft_report = json.loads((args.out / "scft" / "scft.json").read_text())
    print(
        json.dumps(
            {
                "dataset": data.name,
                "n_items": data.n_items,
                "dim": raw.shape[1],
                "device": str(embedder.device),
                **timings,
                "probe": scft_report.get("probe"),
                "final_loss": scft_report.get("final_loss"),
                "temperature": scft_report.get("temperature"),
            },
            default=str,
        )
    )


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    main()
