"""RecBole 1.2.1's SASRec on ml-100k, timed per training epoch — the reference side of bench/srs_speed.py.

Runs INSIDE the RecBole venv (bench/setup_recbole_venv.sh), never the project venv:

    .bench/recbole-venv/bin/python bench/recbole_sasrec.py --epochs 3 --threads 2

Data come from RecBole's own bundled `dataset_example/ml-100k` (same raw file our loader reads). Settings follow
what a RecBole user gets for a sequential model (`quick_start_config/sequential.yaml`: leave-one-out by time,
full ranking), with the model hyper-parameters matched to ours as far as RecBole allows (see bench/README.md).
RecBole's data pipeline is left at its defaults: every prefix of every training sequence becomes one sample.

Timing: `Trainer._train_epoch` is wrapped, so a "training epoch" is one pass over RecBole's train dataloader
(batch collation + negative sampling if any + forward/backward/step) and excludes validation. Validation N@10 of
each epoch is captured by wrapping `Trainer._valid_epoch`. The last stdout line is one JSON object.
"""

from __future__ import annotations

import os

# RecBole 1.2.1 saves its best checkpoint with the whole Config object inside and reloads it with a bare
# torch.load(); torch >= 2.6 defaults to weights_only=True, which refuses that file. The file is the one this
# process just wrote, so loading it fully is safe; this env var (read by torch at each call) restores the old
# default for call sites that do not pass weights_only, without editing RecBole.
os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="the benchmark is cpu")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--inner", type=int, default=128, help="FFN inner size (reference SASRec: = hidden)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=1)
    p.add_argument("--dropout", type=float, default=0.5, help="hidden_dropout_prob and attn_dropout_prob")
    p.add_argument(
        "--act", default="relu", help="FFN activation (RecBole default gelu; reference SASRec relu)"
    )
    p.add_argument("--layer-norm-eps", type=float, default=1e-8)
    p.add_argument("--max-len", type=int, default=200, help="MAX_ITEM_LIST_LENGTH")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--eval-batch-size", type=int, default=4096)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument(
        "--loss",
        choices=["BPR", "CE"],
        default="BPR",
        help="BPR = one uniform negative per sample (closest to SASRec's BCE with one negative); CE = full softmax",
    )
    p.add_argument("--stopping-step", type=int, default=10)
    p.add_argument("--min-core", type=int, default=5, help="user and item k-core ([k,inf) in RecBole terms)")
    p.add_argument("--json-out", type=Path, default=None, help="also write the result JSON here")
    return p.parse_args(argv)


class _Stop(Exception):
    """Raised from the SIGINT / SIGTERM handler to end training early; the epochs already done are kept."""


def _stop(signum: int, frame: object) -> None:
    raise _Stop(signal.Signals(signum).name)


def recbole_config(args: argparse.Namespace, data_path: str, workdir: str) -> dict:
    """The config dict handed to RecBole's Config (overrides its yaml defaults)."""
    cfg = {
        # environment
        "data_path": data_path,
        "checkpoint_dir": os.path.join(workdir, "saved"),
        # RecBole derives its device from gpu_id: "" -> cpu, "0" -> cuda (when available).
        "gpu_id": "0" if args.device == "cuda" else "",
        "use_gpu": args.device == "cuda",
        "worker": 0,
        "seed": args.seed,
        "reproducibility": True,
        "show_progress": False,
        "state": "INFO",
        # data: what quick_start_config/sequential.yaml gives, + 5-core and the ml-100k columns
        "load_col": {"inter": ["user_id", "item_id", "rating", "timestamp"]},
        "user_inter_num_interval": f"[{args.min_core},inf)",
        "item_inter_num_interval": f"[{args.min_core},inf)",
        "MAX_ITEM_LIST_LENGTH": args.max_len,
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full", "group_by": "user"},
        "repeatable": True,
        # model
        "hidden_size": args.hidden,
        "inner_size": args.inner,
        "n_layers": args.layers,
        "n_heads": args.heads,
        "hidden_dropout_prob": args.dropout,
        "attn_dropout_prob": args.dropout,
        "hidden_act": args.act,
        "layer_norm_eps": args.layer_norm_eps,
        "initializer_range": 0.02,
        "loss_type": args.loss,
        # training
        "epochs": args.epochs,
        "train_batch_size": args.batch_size,
        "learner": "adam",
        "learning_rate": args.lr,
        "weight_decay": 0.0,
        "stopping_step": args.stopping_step,
        "eval_step": 1,
        # evaluation
        "metrics": ["NDCG", "Hit"],
        "topk": [10],
        "valid_metric": "NDCG@10",
        "eval_batch_size": args.eval_batch_size,
    }
    if args.loss == "CE":
        cfg["train_neg_sample_args"] = None  # RecBole refuses CE with negative sampling
    else:
        cfg["train_neg_sample_args"] = {"distribution": "uniform", "sample_num": 1}
    return cfg


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)

    import recbole
    import torch
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.model.sequential_recommender import SASRec
    from recbole.trainer import Trainer
    from recbole.utils import init_seed

    torch.set_num_threads(args.threads)
    # RecBole logs through the root logger; send it to stderr only (no log/ files), keep stdout for the JSON.
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")

    data_path = str(Path(recbole.__file__).parent / "dataset_example")
    result: dict = {}
    with tempfile.TemporaryDirectory(prefix="recbole-bench-") as workdir:
        # RecBole writes log_tensorboard/ and saved/ relative to the cwd; keep them out of the repo.
        cwd = os.getcwd()
        os.chdir(workdir)
        try:
            t0 = time.perf_counter()
            # RecBole's Config also parses `--key=value` from sys.argv; the flags there are ours, not its.
            sys.argv = sys.argv[:1]
            config = Config(
                model="SASRec", dataset="ml-100k", config_dict=recbole_config(args, data_path, workdir)
            )
            init_seed(config["seed"], config["reproducibility"])
            dataset = create_dataset(config)
            # RecBole counts a [PAD] user and item; create_dataset's inter_num is before the prefix augmentation.
            n_users, n_items, n_inters = dataset.user_num - 1, dataset.item_num - 1, dataset.inter_num
            train_data, valid_data, test_data = data_preparation(config, dataset)
            init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
            model = SASRec(config, train_data._dataset).to(config["device"])
            trainer = Trainer(config, model)
            setup_s = time.perf_counter() - t0

            history: list[dict] = []
            train_epoch, valid_epoch = trainer._train_epoch, trainer._valid_epoch

            def timed_train_epoch(train_data, epoch_idx, *a, **kw):
                t = time.perf_counter()
                loss = train_epoch(train_data, epoch_idx, *a, **kw)
                history.append(
                    {"epoch": epoch_idx + 1, "loss": float(loss), "seconds": time.perf_counter() - t}
                )
                return loss

            def timed_valid_epoch(valid_data, *a, **kw):
                t = time.perf_counter()
                score, res = valid_epoch(valid_data, *a, **kw)
                history[-1]["val_N@10"] = float(res["ndcg@10"])
                history[-1]["val_H@10"] = float(res["hit@10"])
                history[-1]["val_seconds"] = time.perf_counter() - t
                return score, res

            trainer._train_epoch, trainer._valid_epoch = timed_train_epoch, timed_valid_epoch
            # An epoch takes minutes here: Ctrl-C / SIGTERM ends training at once (the running epoch is
            # dropped) and still reports the finished epochs and the test metrics of the best checkpoint.
            stopped_by = None
            old = {sig: signal.signal(sig, _stop) for sig in (signal.SIGINT, signal.SIGTERM)}
            t_fit = time.perf_counter()
            try:
                trainer.fit(train_data, valid_data, saved=True, show_progress=False)
            except _Stop as e:
                stopped_by = str(e)
                logging.getLogger().warning("stopped by %s after %d full epochs", stopped_by, len(history))
            finally:
                for sig, handler in old.items():
                    signal.signal(sig, handler)
            fit_s = time.perf_counter() - t_fit
            history[:] = [h for h in history if "val_N@10" in h]  # an epoch counts once it was validated
            if not history:
                raise SystemExit("no epoch finished; nothing to report")
            best_score = trainer.best_valid_score
            test = trainer.evaluate(test_data, load_best_model=True, show_progress=False)
        finally:
            os.chdir(cwd)

    secs = [h["seconds"] for h in history]
    best = max(history, key=lambda h: (h.get("val_N@10", float("-inf")), -h["epoch"]))
    best_epoch = best["epoch"]
    result = {
        "library": f"recbole-{recbole.__version__}",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": str(config["device"]),
        "loss_type": args.loss,
        "n_users": int(n_users),
        "n_items": int(n_items),
        "n_inters": int(n_inters),
        "train_samples_per_epoch": len(train_data.dataset),
        "batches_per_epoch": len(train_data),
        "epochs_run": len(history),
        "stopped_by_signal": stopped_by,
        "seconds_per_epoch_mean": statistics.fmean(secs),
        "seconds_per_epoch_median": statistics.median(secs),
        "best_val_N@10": float(best_score),
        "best_epoch": best_epoch,
        "seconds_to_best": sum(h["seconds"] for h in history if h["epoch"] <= best_epoch),
        "seconds_to_best_incl_eval": sum(
            h["seconds"] + h.get("val_seconds", 0.0) for h in history if h["epoch"] <= best_epoch
        ),
        "test_N@10": float(test["ndcg@10"]),
        "test_H@10": float(test["hit@10"]),
        "setup_seconds": setup_s,
        "fit_seconds": fit_s,
        "history": history,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    line = json.dumps(result)
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(line + "\n")
    print(line, flush=True)
    return result


if __name__ == "__main__":
    main()
