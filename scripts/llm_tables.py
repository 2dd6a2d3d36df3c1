"""A dataset's raw and SCFT-tuned LLM item tables in one call (used by scripts/paper_grid.py), on the commands
`llmemb embed` and `llmemb train scft`:

    python scripts/llm_tables.py --dataset ml-100k --llm smollm2 --out runs/llm/ml-100k --epochs 20

is `llmemb embed` (base LLM) -> OUT/llm_raw.safetensors (LLM2X, "w/o SCFT"), `llmemb train scft` -> OUT/scft/
(lora/ + scft.json with the retrieval probe before/after, probe items not held out), and `llmemb embed --lora
OUT/scft/lora` -> OUT/llm_scft.safetensors (LLMEmb). Tables are (n_items + 1, d) float32, row 0 = padding;
`--half-copy DIR` also writes DIR/<dataset>-llm_raw.safetensors and -llm_scft.safetensors in float16 for transfer.
Finished parts are not redone (same table metadata / same SCFT fingerprint). For the whole method in one command
see `llmemb pipeline`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llmemb.cli import main as llmemb  # noqa: E402
from training.embed import read_table_metadata  # noqa: E402
from training.split import prepare  # noqa: E402


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
    p.add_argument("--view-mode", default="auto", choices=["auto", "attr", "span"], help="SCFT views")
    p.add_argument("--drop", type=float, default=0.2, help="drop ratio for attributes / word spans")
    p.add_argument("--max-length", type=int, default=64, help="prompt tokens kept")
    p.add_argument("--embed-batch", type=int, default=64, help="catalog embedding batch size")
    p.add_argument(
        "--half-copy", type=Path, default=None, help="also write float16 copies of the tables here"
    )
    args = p.parse_args()

    name = prepare(args.dataset).name
    llm = ["--dataset", args.dataset, "--llm", args.llm, "--max-length", str(args.max_length)]
    embed = ["embed", *llm, "--batch-size", str(args.embed_batch)]
    tables = {}
    for kind, extra in (("raw", []), ("scft", ["--lora", str(args.out / "scft" / "lora")])):
        if kind == "scft":
            steps = ["--max-steps", str(args.max_steps)] if args.max_steps else []
            llmemb(
                ["train", "scft", *llm, "--out", str(args.out / "scft"), "--epochs", str(args.epochs), *steps]
                + ["--batch-size", str(args.batch_size), "--lr", str(args.lr), "--lora-r", str(args.lora_r)]
                + ["--view-mode", args.view_mode, "--drop", str(args.drop), "--no-probe-holdout"]
            )
        tables[kind] = args.out / f"llm_{kind}.safetensors"
        half = (
            ["--half-copy", str(args.half_copy / f"{name}-llm_{kind}.safetensors")] if args.half_copy else []
        )
        llmemb([*embed, *extra, "--out", str(tables[kind]), *half])
    scft = json.loads((args.out / "scft" / "scft.json").read_text(encoding="utf-8"))
    meta = {k: read_table_metadata(t) for k, t in tables.items()}
    summary = {
        "dataset": name,
        "rows": int(meta["raw"]["rows"]),
        "dim": int(meta["raw"]["dim"]),
        "embed_raw_s": float(meta["raw"].get("seconds", "nan")),
        "scft_s": scft.get("seconds"),
        "embed_scft_s": float(meta["scft"].get("seconds", "nan")),
        "probe": scft.get("probe"),
        "final_loss": scft.get("final_loss"),
        "temperature": scft.get("temperature"),
    }
    print(json.dumps(summary, default=str))


if __name__ == "__main__":
    main()
