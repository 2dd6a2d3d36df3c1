"""Score fusion of two trained backbones: s(u, i) = s_a(u, i) + w * s_b(u, i), w chosen on validation.

    python scripts/fusion_eval.py --dataset amazon-beauty --seed 42 \
        --a runs/x/llmemb-run --b runs/x/id-run --label "LLMEmb ⊕ ID-SASRec" --out runs/x/fused/metrics.json

`--a` / `--b`: a checkpoint directory (`llmemb train srs` / `train rat` output) or a folder holding exactly one.
The fused model is exact and servable as one model: its user vector is [u_a ; w u_b] and its item table
[t_a ; t_b], so one inner product gives the fused score. Every w of `--weights` is evaluated on valid and test
(both protocols, all slices); the reported w is the one with the best validation full-ranking N@10 overall, the
criterion early stopping uses. `--out` gets a metrics.json in the format of a training run (so `llmemb report
collect` aggregates it) plus "fusion_w" and the whole curve.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from torch import nn

from training.evaluate import Evaluator
from training.split import prepare
from training.srs import load_checkpoint


class Fused(nn.Module):
    """[u_a ; w u_b] . [t_a ; t_b] = s_a + w s_b; w = inf scores with b alone."""

    def __init__(self, a: nn.Module, b: nn.Module, w: float) -> None:
        super().__init__()
        self.a, self.b, self.w = a, b, w

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        if math.isinf(self.w):
            return self.b(seq)
        return torch.cat([self.a(seq), self.w * self.b(seq)], dim=-1)

    def item_table(self) -> torch.Tensor:
        if math.isinf(self.w):
            return self.b.item_table()
        return torch.cat([self.a.item_table(), self.b.item_table()], dim=-1)

    def score(self, user: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return user @ items.T


def checkpoint_dir(path: Path) -> Path:
    if (path / "config.json").is_file():
        return path
    found = sorted(p.parent for p in path.rglob("config.json") if (p.parent / "model.safetensors").is_file())
    if len(found) != 1:
        raise SystemExit(f"{path}: expected one checkpoint below it, found {len(found)}")
    return found[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True)
    p.add_argument("--seed", type=int, required=True, help="evaluation seed (the negatives)")
    p.add_argument("--a", type=Path, required=True, help="checkpoint of the first model")
    p.add_argument("--b", type=Path, required=True, help="checkpoint of the second model")
    p.add_argument(
        "--weights", type=float, nargs="+", default=[0, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 4, math.inf]
    )
    p.add_argument("--label", default="fused", help="method label recorded in metrics.json")
    p.add_argument("--llm", default=None, help="llm recorded in metrics.json (default: a's run)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, default=None, help="metrics.json to write")
    args = p.parse_args()

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    data = prepare(args.dataset)
    a_dir, b_dir = checkpoint_dir(args.a), checkpoint_dir(args.b)
    a, a_cfg = load_checkpoint(a_dir, device)
    b, _ = load_checkpoint(b_dir, device)
    llm = args.llm
    if llm is None and (a_dir / "metrics.json").is_file():
        llm = json.loads((a_dir / "metrics.json").read_text())["llm"]
    llm = llm or None  # "" = two ID models
    ev = Evaluator(data, args.seed)
    curve = []
    print("w      stage  | s-ov H@10 s-tail H@10 | full-ov H@10 N@10 | full-tail H@10 N@10")
    for w in args.weights:
        row = {"w": w}
        for stage in ("valid", "test"):
            res = ev.evaluate(Fused(a, b, w), stage)
            row[stage] = res
            s, f = res["sampled100"], res["full"]
            print(
                f"{w:<6g} {stage:6s} | {s['overall']['H@10']:.4f}    {s['tail']['H@10']:.4f}      | "
                f"{f['overall']['H@10']:.4f} {f['overall']['N@10']:.4f} | "
                f"{f['tail']['H@10']:.4f} {f['tail']['N@10']:.4f}",
                flush=True,
            )
        curve.append(row)
    best = max(curve, key=lambda r: r["valid"]["full"]["overall"]["N@10"])
    print(f"selected w = {best['w']:g} (best validation full N@10 overall)")
    if args.out:
        payload = {
            "dataset": data.name,
            "backbone": a_cfg.backbone,
            "method": args.label,
            "llm": llm,
            "seed": args.seed,
            "fusion_w": best["w"],
            "fusion_selected_by": "valid full overall N@10",
            "a": str(a_dir),
            "b": str(b_dir),
            "best_val_N@10": best["valid"]["full"]["overall"]["N@10"],
            "test": best["test"],
            "curve": curve,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload, indent=1, default=str))
        tmp.replace(args.out)


if __name__ == "__main__":
    main()
