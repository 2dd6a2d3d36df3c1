"""The paper's Table 1 / Table 2 grid (plus the γ sweep and the variants beyond the paper) as parallel processes.

    python scripts/paper_grid.py --work /tmp/grid --llm /path/smollm2.gguf --llm-name SmolLM2-135M-Instruct \
        --dataset ml-100k --dataset path/to/amazon-beauty --parallel 20 --deadline 540

Jobs, with their dependencies:
  tables-<ds>            scripts/llm_tables.py: raw + SCFT LLM tables (LLM2X / w/o SCFT use raw, the rest SCFT)
  id-<ds>-s<seed>        ID-SASRec (`llmemb train srs`), the alignment target of RAT
  id-<ds>-ce-s<seed>     ID-SASRec trained with the catalog-softmax loss (`--loss ce`, a variant)
  <ds>-<bb>-<method>-s<seed>   `llmemb train rat` (needs the tables; aligned methods also need id-<ds>-s<seed>)
  fuse-<job>[-<job b>]   scripts/fusion_eval.py: score fusion of a finished run with the ID-SASRec of its seed (or
                         with job b), the weight chosen on validation (`--variants`, on by default)

Every job writes into WORK/jobs/<name>/ and counts as done when a metrics.json (RAT / ID) or llm_scft.safetensors
(tables) is there, so rerunning the same command skips finished work: a grid too big for one sitting is finished by
running it again. `--deadline S` stops launching jobs S seconds after the start and kills what still runs at
S + `--grace`; killed jobs start from scratch next time
(`--detach` leaves them running for the next sitting instead). At the end the metrics.json files of finished runs are
collected with `llmemb report collect` and, with `--copy-to DIR`, copied there (tables too, as float16).

Several GPUs: `--gpus N` gives each job one card, round robin. A second LLM's grid beside the first (own --work)
shares the first one's ID-SASRec runs with `--reuse-ids FIRST_WORK` instead of training them again:

    python scripts/paper_grid.py --work /tmp/gs --llm smollm2 --llm-name SmolLM2-135M-Instruct ... --gpus 4 &
    python scripts/paper_grid.py --work /tmp/gm --llm minilm --llm-name all-MiniLM-L6-v2 ... --gpus 4 \
        --reuse-ids /tmp/gs
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BACKBONES = ("sasrec", "gru4rec", "bert4rec")


def job_slug(text: str) -> str:
    """A job name from a run label: spaces to underscores, no slashes or brackets."""
    return text.replace(" ", "_").translate(str.maketrans("", "", "/()"))


@dataclass
class Job:
    name: str
    argv: list[str]
    done_file: str  # relative to the job dir
    deps: list[str] = field(default_factory=list)
    proc: subprocess.Popen | None = None
    pid: int | None = None  # a job left running by an earlier sitting (--detach)
    started: float = 0.0

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
        except OSError:
            return False
        return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _slug(ds: str) -> str:
    return Path(ds).name


def build_jobs(args: argparse.Namespace) -> list[Job]:
    llmemb = [sys.executable, "-m", "llmemb"]
    work = args.work / "jobs"
    common = ["--epochs", str(args.epochs), "--patience", str(args.patience)]
    jobs: list[Job] = []
    for ds in args.dataset:
        d = _slug(ds)
        tdir = work / f"tables-{d}"
        scft = ["--epochs", str(args.scft_epochs.get(d, 3)), "--batch-size", str(args.scft_batch)]
        jobs.append(
            Job(
                f"tables-{d}",
                [sys.executable, str(ROOT / "scripts" / "llm_tables.py"), "--dataset", ds, "--llm", args.llm]
                + ["--out", str(tdir)]
                + scft,
                "llm_scft.safetensors",
            )
        )
        raw, tuned = tdir / "llm_raw.safetensors", tdir / "llm_scft.safetensors"

        def id_run(seed: int, tag: str = "", extra=(), d=d, ds=ds) -> None:
            """ID-SASRec (`id-<ds>[-<tag>]-s<seed>`); the untagged one is RAT's alignment target."""
            name = f"id-{d}{'-' + tag if tag else ''}-s{seed}"
            argv = llmemb + ["train", "srs", "--dataset", ds, "--backbone", "sasrec", "--seeds", str(seed)]
            jobs.append(
                Job(name, argv + ["--out", str(work / name)] + common + list(extra), "**/metrics.json")
            )

        for seed in args.seeds:
            id_run(seed)

        def rat(bb: str, method: str, seed: int, table: Path, label: str | None = None, extra=(), d=d, ds=ds):
            lab = label or method
            name = job_slug(f"{d}-{bb}-{lab}-s{seed}")
            aligned = method not in ("LLM2X", "LLMEmb w/o adapter", "LLMEmb w/o align", "None")
            id_dir = work / f"id-{d}-s{seed}" / d / "sasrec" / f"seed{seed}"
            argv = llmemb + ["train", "rat", "--dataset", ds, "--backbone", bb, "--seeds", str(seed)]
            argv += ["--method", method, "--label", lab, "--llm-table", str(table)]
            argv += ["--llm-name", args.llm_name, "--out", str(work / name), "--gamma", str(args.gamma)]
            argv += ["--id-checkpoint", str(id_dir)] if aligned else ["--alpha", "0"]
            argv += common + list(extra)
            deps = [f"tables-{d}"] + ([f"id-{d}-s{seed}"] if aligned else [])
            jobs.append(Job(name, argv, "**/metrics.json", deps))
            return name

        def fuse(rat_job: str, label: str, seed: int, b_job: str | None = None, d=d, ds=ds):
            """Score fusion of a finished run with the ID-SASRec of the same seed (scripts/fusion_eval.py)."""
            b_job = b_job or f"id-{d}-s{seed}"
            name = f"fuse-{rat_job}" if b_job == f"id-{d}-s{seed}" else f"fuse-{rat_job}-{b_job}"
            argv = [
                sys.executable,
                str(ROOT / "scripts" / "fusion_eval.py"),
                "--dataset",
                ds,
                "--seed",
                str(seed),
            ]
            argv += ["--a", str(work / rat_job), "--b", str(work / b_job), "--label", label]
            argv += ["--out", str(work / name / "metrics.json")]
            if rat_job.startswith("id-"):
                argv += ["--llm", ""]
            jobs.append(Job(name, argv, "metrics.json", [rat_job, b_job]))

        for seed in args.seeds:
            # Slow ones first (Bert4Rec / GRU4Rec on big catalogs), so they get the most of a sitting.
            for bb in ("gru4rec", "bert4rec", "sasrec"):
                rat(bb, "LLMEmb", seed, tuned)
                rat(bb, "LLM2X", seed, raw)
            rat("sasrec", "LLMEmb+gatedID", seed, tuned)
            rat("sasrec", "LLMEmb+ID", seed, tuned)
            rat("sasrec", "LLMEmb w/o SCFT", seed, raw)
            for m in ("LLMEmb w/o adapter", "LLMEmb w/o freeze", "LLMEmb w/o align"):
                rat("sasrec", m, seed, tuned)
            if args.variants:
                # Beyond the paper: a residual that must not carry the item alone, a stronger pull, and score
                # fusion of the LLM-side runs with the ID-SASRec they were aligned to (plus ID + ID, the control
                # for "two models beat one").
                rdrop = rat(
                    "sasrec",
                    "LLMEmb+ID",
                    seed,
                    tuned,
                    label="LLMEmb+ID rdrop0.5",
                    extra=("--residual-dropout", "0.5"),
                )
                rat("sasrec", "LLMEmb", seed, tuned, label="LLMEmb alpha=0.1", extra=("--alpha", "0.1"))
                for lab in ("LLMEmb", "LLM2X", "LLMEmb w/o align", "LLMEmb+ID"):
                    fuse(
                        job_slug(f"{d}-sasrec-{lab}-s{seed}"),
                        f"{lab} + ID-SASRec",
                        seed,
                    )
                fuse(rdrop, "LLMEmb+ID rdrop0.5 + ID-SASRec", seed)
                llm2x = f"{d}-sasrec-LLM2X-s{seed}"
                for lab in (
                    "LLMEmb",
                    "LLMEmb w/o align",
                ):  # frozen semantic table + trainable LLM-initialised one
                    job = job_slug(f"{d}-sasrec-{lab}-s{seed}")
                    fuse(job, f"{lab} + LLM2X", seed, b_job=llm2x)
                # The catalog-softmax loss instead of BCE with one sampled negative, for the ID baseline and the
                # LLM rows alike (aligned runs keep the BCE ID-SASRec as their target): a sampled negative is
                # rarely a popular item, so BCE never teaches a frozen semantic table to rank those.
                ce = ("--loss", "ce")
                id_run(seed, "ce", ce + ("--label", "None (CE)"))
                for m, table in (
                    ("LLMEmb", tuned),
                    ("LLM2X", raw),
                    ("LLMEmb w/o align", tuned),
                    ("LLMEmb+ID", tuned),
                ):
                    rat("sasrec", m, seed, table, label=f"{m} (CE)", extra=ce)
                # The residual starting where LLM2X starts (PCA of the SCFT table to H) instead of at zero.
                lab = "LLMEmb+ID pcainit (CE)"
                rat("sasrec", "LLMEmb+ID", seed, tuned, label=lab, extra=ce + ("--residual-pca-init",))
                # The residual dropped whole in training (the best Beauty row with the reference loss), with this loss.
                lab = "LLMEmb+ID rdrop0.5 (CE)"
                rat("sasrec", "LLMEmb+ID", seed, tuned, label=lab, extra=ce + ("--residual-dropout", "0.5"))
                # Both at once (the LLM2X-like residual must leave the semantic branch able to rank alone), and
                # both built on the raw LLM table instead of the SCFT one (on Beauty's title-only prompts the
                # frozen rows are better without SCFT, and LLM2X's own init is the raw table's PCA).
                pcainit = ce + ("--residual-pca-init",)
                for table, tag, drops in ((tuned, "", ("0.2", "0.5")), (raw, " w/o SCFT", (None, "0.5"))):
                    for p in drops:
                        rdrop, extra = (f" rdrop{p}", ("--residual-dropout", p)) if p else ("", ())
                        lab = f"LLMEmb+ID pcainit{rdrop}{tag} (CE)"
                        rat("sasrec", "LLMEmb+ID", seed, table, label=lab, extra=pcainit + extra)
                nxt = args.seeds[(args.seeds.index(seed) + 1) % len(args.seeds)]
                if nxt != seed:
                    fuse(f"id-{d}-s{seed}", "ID-SASRec + ID-SASRec", seed, b_job=f"id-{d}-s{nxt}")
        for seed in args.sweep_seeds:
            for g in args.gamma_sweep:
                rat("sasrec", "LLMEmb", seed, tuned, label=f"LLMEmb gamma={g:g}", extra=("--gamma", str(g)))
    # `--gamma` given twice in the sweep: argparse keeps the last one, the sweep's.
    return jobs


def done(job: Job, work: Path) -> bool:
    return any((work / "jobs" / job.name).glob(job.done_file))


def gpu_list(text: str) -> list[str]:
    """``--gpus``: a count N -> cards 0..N-1 (N <= 1: leave CUDA_VISIBLE_DEVICES alone), or a comma list of card
    ids -> those (one card: "2,")."""
    parts = [x.strip() for x in text.split(",") if x.strip()]
    if not parts or not all(x.isdigit() for x in parts):
        raise argparse.ArgumentTypeError(f"--gpus takes a count or a comma list of card ids, got {text!r}")
    if "," not in text:
        return [str(i) for i in range(int(parts[0]))] if int(parts[0]) > 1 else []
    return parts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True, help="work directory (jobs/, logs/)")
    p.add_argument("--dataset", action="append", required=True, help="dataset name or path (repeatable)")
    p.add_argument("--llm", required=True, help="LLM source for llm_tables.py (smollm2 | minilm | path)")
    p.add_argument("--llm-name", required=True, help="the `llm` recorded with every result")
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    p.add_argument("--sweep-seeds", type=int, nargs="*", default=[42], help="seeds of the gamma sweep")
    p.add_argument("--gamma", type=float, default=0.1, help="alignment temperature of the main runs")
    p.add_argument("--gamma-sweep", type=float, nargs="*", default=[0.05, 0.5, 1.0])
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--patience", type=int, default=20)
    p.add_argument(
        "--scft-epochs",
        nargs="*",
        default=["ml-100k=20", "amazon-beauty=3"],
        help="SCFT epochs per dataset as NAME=N (default 3)",
    )
    p.add_argument("--scft-batch", type=int, default=128)
    p.add_argument("--parallel", type=int, default=16, help="jobs at once")
    p.add_argument(
        "--gpus",
        type=gpu_list,
        default=None,
        help="spread jobs over GPUs (CUDA_VISIBLE_DEVICES, round robin): a count N (cards 0..N-1) or a list "
        "of card ids such as 1,2,3 (leaving card 0 to other work; one card: '2,')",
    )
    p.add_argument(
        "--reuse-ids",
        type=Path,
        default=None,
        help="take the ID-SASRec runs (id-<ds>-s<seed>) from this other grid's work dir (linked once done there) "
        "instead of training them again: a second LLM's grid running beside the first shares its ID models",
    )
    p.add_argument(
        "--variants",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the variants beyond the paper",
    )
    p.add_argument("--deadline", type=float, default=None, help="stop launching after this many seconds")
    p.add_argument("--grace", type=float, default=40.0, help="kill running jobs this long after the deadline")
    p.add_argument(
        "--detach",
        action="store_true",
        help="at the deadline leave running jobs running (own session) instead of killing them; the next "
        "sitting waits for them through their pid files",
    )
    p.add_argument("--only", nargs="*", default=None, help="run only jobs whose name contains one of these")
    p.add_argument(
        "--skip",
        nargs="*",
        default=None,
        help="leave out jobs whose name contains one of these (after --only)",
    )
    p.add_argument("--copy-to", type=Path, default=None, help="copy metrics.json files and f16 tables here")
    p.add_argument("--list", action="store_true", help="print the jobs and exit")
    args = p.parse_args(argv)
    args.scft_epochs = {k: int(v) for k, v in (s.split("=", 1) for s in args.scft_epochs)}

    jobs = build_jobs(args)
    if args.only:
        keep = {j.name for j in jobs if any(s in j.name for s in args.only)}
        keep |= {d for j in jobs if j.name in keep for d in j.deps}
        jobs = [j for j in jobs if j.name in keep]
    if args.skip:
        jobs = [j for j in jobs if not any(s in j.name for s in args.skip)]
    if args.list:
        for j in jobs:
            print(j.name, "(done)" if done(j, args.work) else "", "<-", ",".join(j.deps))
            print("   ", shlex.join(j.argv))
        return 0
    logs = args.work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TQDM_DISABLE="1")
    t0 = time.monotonic()
    pending = [j for j in jobs if not done(j, args.work)]
    finished = {j.name for j in jobs if done(j, args.work)}
    failed: set[str] = set()
    running: list[Job] = []
    launched = 0
    for j in list(pending):  # jobs still running from an earlier sitting
        pid_file = args.work / "jobs" / j.name / "pid"
        if pid_file.is_file():
            j.pid = int(pid_file.read_text())
            if j.alive():
                pending.remove(j)
                running.append(j)
                print(f"re-attached {j.name} (pid {j.pid})")
    print(f"{len(pending)} jobs to run, {len(finished)} already done", flush=True)
    while pending or running:
        elapsed = time.monotonic() - t0
        for j in list(running):
            if not j.alive():
                running.remove(j)
                ok = (j.proc is None or j.proc.returncode == 0) and done(j, args.work)
                (finished if ok else failed).add(j.name)
                print(f"[{elapsed:6.0f}s] {'done' if ok else 'FAILED'} {j.name} ({elapsed - j.started:.0f}s)")
        if args.deadline is not None and elapsed > args.deadline + args.grace:
            if args.detach:
                print(f"[{elapsed:6.0f}s] left running: {[j.name for j in running]}")
                break
            for j in running:
                os.kill(j.proc.pid if j.proc else j.pid, 9)
                print(f"[{elapsed:6.0f}s] killed {j.name} at the deadline")
            break
        launch = args.deadline is None or elapsed < args.deadline
        if (
            args.reuse_ids
        ):  # the ID-SASRec runs come from another grid's work dir, as soon as they are done there
            for j in [j for j in pending if j.name.startswith("id-")]:
                src = (args.reuse_ids / "jobs" / j.name).resolve()
                if any(src.glob(j.done_file)):
                    dst = args.work / "jobs" / j.name
                    if dst.is_symlink() or (dst.is_dir() and not any(dst.iterdir())):
                        dst.unlink() if dst.is_symlink() else dst.rmdir()
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    dst.symlink_to(src, target_is_directory=True)
                    pending.remove(j)
                    finished.add(j.name)
                    print(f"[{elapsed:6.0f}s] reused {j.name} from {src}")
        for j in list(pending):
            if not launch or len(running) >= args.parallel:
                break
            if args.reuse_ids and j.name.startswith("id-"):
                continue  # waits for the other grid
            if any(d in failed for d in j.deps):
                pending.remove(j)
                failed.add(j.name)
                continue
            if all(d in finished for d in j.deps):
                pending.remove(j)
                (args.work / "jobs" / j.name).mkdir(parents=True, exist_ok=True)
                log = open(logs / f"{j.name}.log", "w")  # noqa: SIM115 (closed with the process)
                launched += 1
                j.proc = subprocess.Popen(
                    j.argv,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env
                    if not args.gpus
                    else dict(env, CUDA_VISIBLE_DEVICES=args.gpus[launched % len(args.gpus)]),
                    cwd=ROOT,
                    start_new_session=args.detach,
                )
                (args.work / "jobs" / j.name / "pid").write_text(str(j.proc.pid))
                j.started = elapsed
                running.append(j)
        if not launch and not running:
            break
        sys.stdout.flush()
        time.sleep(2)
    print(
        f"finished {len(finished)}, failed {len(failed)}: {sorted(failed)}; left {len(pending)}", flush=True
    )
    runs = [str(args.work / "jobs")]
    subprocess.run([sys.executable, "-m", "llmemb", "report", "collect", *runs], env=env, cwd=ROOT)
    if args.copy_to:
        _copy_results(args.work, args.copy_to)
    return 0


def _copy_results(work: Path, dest: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    for f in (work / "jobs").rglob("metrics.json"):
        target = dest / "runs" / f.relative_to(work / "jobs")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, target)
    for f in (work / "jobs").glob("tables-*/*.safetensors"):
        t = load_file(str(f))["weight"].to(torch.float16).contiguous()
        (dest / "tables").mkdir(parents=True, exist_ok=True)
        save_file({"weight": t}, str(dest / "tables" / f"{f.parent.name}-{f.stem}.f16.safetensors"))
    for f in (work / "jobs").glob("tables-*/scft/scft.json"):
        shutil.copy2(f, dest / "tables" / f"{f.parent.parent.name}-scft.json")
    for f in (work / "jobs").glob("id-*/*/sasrec/seed*/*"):  # the alignment targets, to resume elsewhere
        if f.suffix in (".json", ".safetensors"):
            target = dest / "id" / f.relative_to(work / "jobs")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, target)
    shutil.copytree(work / "logs", dest / "logs", dirs_exist_ok=True)


if __name__ == "__main__":
    sys.exit(main())
