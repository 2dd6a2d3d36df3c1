#!/usr/bin/env bash
# Builds the isolated venv that runs RecBole 1.2.1 for bench/srs_speed.py.
#
# RecBole 1.2.1 needs old pins (numpy<2, pandas<2.3, scipy<1.14) that clash with the project venv, so it gets
# its own venv at .bench/recbole-venv (git-ignored through .git/info/exclude). Idempotent: a complete venv is
# left as it is; a partial one is completed.
#
#   bash bench/setup_recbole_venv.sh
#   PYTHON=python3.11 RECBOLE_VENV=/tmp/rb bash bench/setup_recbole_venv.sh   # other interpreter / location
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${RECBOLE_VENV:-$ROOT/.bench/recbole-venv}"
PYTHON="${PYTHON:-python3}"
TORCH_PIN="torch==2.13.0"  # the project's CPU build (a local wheel); pinned so pip never resolves a CUDA build

# Keep .bench/ out of git without touching the tracked .gitignore.
EXCLUDE="$ROOT/.git/info/exclude"
if [ -d "$ROOT/.git" ] && ! grep -qxF '/.bench/' "$EXCLUDE" 2>/dev/null; then
    echo '/.bench/' >>"$EXCLUDE"
fi

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --disable-pip-version-check -q)

# 1) torch first, alone, so nothing later can swap it for a CUDA build.
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
    "${PIP[@]}" "$TORCH_PIN"
fi

# 2) RecBole without its declared deps (they pull ray, plotly, thop and an unpinned torch), then exactly what
#    recbole.config / data / model / trainer import at run time, with the old pins. torch is repeated in the
#    same resolve so pip cannot replace it. Not installed because bench/recbole_sasrec.py never imports the
#    modules that need them: ray (recbole.quick_start), hyperopt and plotly (hyper-parameter tuning), thop
#    (get_flops), psutil (get_environment), tabulate.
RUNTIME_DEPS=(
    "$TORCH_PIN"
    "numpy<2"
    "pandas<2.3"
    "scipy<1.14"
    "scikit-learn"      # recbole.evaluator.metrics imports sklearn.metrics
    "pyyaml"            # recbole.config
    "colorlog==4.7.2"   # recbole.utils.logger; RecBole pins these two exact versions
    "colorama==0.4.4"
    "tqdm"
    "tensorboard"       # recbole.utils.utils imports torch.utils.tensorboard.SummaryWriter unconditionally
    "texttable"         # recbole.utils.utils imports Texttable at module level
)
CHECK='
import importlib.metadata as md, sys
import numpy
from recbole.config import Config
from recbole.data import create_dataset, data_preparation
from recbole.model.sequential_recommender import SASRec
from recbole.trainer import Trainer
from recbole.utils import init_seed
ok = md.version("recbole") == "1.2.1" and numpy.__version__.startswith("1.") and md.version("torch").startswith("2.13.0")
sys.exit(0 if ok else 1)
'
if ! "$PY" -c "$CHECK" 2>/dev/null; then
    "${PIP[@]}" --no-deps "recbole==1.2.1"
    "${PIP[@]}" "${RUNTIME_DEPS[@]}"
    "$PY" -c "$CHECK"  # fail loudly if something is still missing
fi

"$PY" -c '
import importlib.metadata as md
print(" ".join(f"{p}=={md.version(p)}" for p in ("torch", "recbole", "numpy", "pandas", "scipy", "scikit-learn")))
'
echo "RecBole venv ready: $VENV"
