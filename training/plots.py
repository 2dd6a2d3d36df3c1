"""Pictures of finished runs: popularity-group bars (paper Fig. 5) and 2-D maps of item tables (paper Fig. 6).

Both read run directories as `llmemb train srs` / `llmemb train rat` write them: `metrics.json` (its "test" holds
the evaluator's per-group slices "group1".."groupN", group 1 the least popular items, equal-size groups by
training count; see training/evaluate.py) beside the checkpoint (`config.json` + `model.safetensors`).

- Fig. 5 (`plot_group_bars`): H@10 and N@10 per popularity group, one bar per method, mean over seeds with the
  sample std (ddof=1, as in the results tables) as error bar. One PNG per (dataset, backbone, protocol).
- Fig. 6 (`plot_embedding_maps`): each method's effective item table (`run_item_table`: the table the backbone
  scores with; the trained ID table for None and LLM2X, the adapter output, frozen, for LLMEmb) projected to 2-D
  by PCA (models/pca.py, fit on items 1..n), points coloured by training-set count on a log scale. One PNG per
  (dataset, backbone), one panel per method. The paper uses t-SNE; exact t-SNE is O(n^2) per iteration (12k Beauty
  items: ~150M pairs, hundreds of iterations), far over a CPU budget of seconds, so this is PCA only: linear,
  deterministic, and it shows the directions the table spends most variance on. Each panel also reports R^2 of
  log(1 + count) regressed on the two coordinates: how much of the picture is popularity.

The plotting functions return the numbers they drew (bar heights read back from the axes; map coordinates), so a
test can check them against the metrics files. PNGs are written atomically (models/io) with matplotlib's Agg
canvas; no pyplot, no global backend switch.

    runs = find_runs([Path("runs")])
    written = write_figures(runs, Path("docs/figures"), popularity={"ml-100k": data.item_popularity()})
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter

from models.io import atomic_write_bytes
from models.pca import PCA
from training.evaluate import popularity_groups

RUN_METRICS = "metrics.json"  # what training/cli.write_run_metrics writes beside each checkpoint
DEFAULT_METHODS = ("None", "LLM2X", "LLMEmb")
DEFAULT_PROTOCOLS = ("sampled100", "full")
METRICS = ("H@10", "N@10")
DEFAULT_OUT = Path("docs/figures")
DPI = 110
_GROUP_KEY = re.compile(r"^group(\d+)$")


@dataclass(frozen=True)
class Run:
    """One finished seed: the directory holding metrics.json (and the checkpoint) and what metrics.json says."""

    path: Path
    dataset: str
    backbone: str
    method: str
    llm: str | None
    seed: int
    test: dict

    @property
    def label(self) -> str:
        """Legend / panel label: the method, with the LLM in parentheses where there is one."""
        return self.method if self.llm is None else f"{self.method} ({self.llm})"


def find_runs(paths: Iterable[Path]) -> list[Run]:
    """Every metrics.json under `paths` (a file, a run directory or a folder above runs), sorted by path."""
    runs = []
    for root in paths:
        root = Path(root)
        files = [root] if root.name == RUN_METRICS else sorted(root.rglob(RUN_METRICS))
        for f in files:
            m = json.loads(f.read_text(encoding="utf-8"))
            runs.append(
                Run(
                    f.parent,
                    m["dataset"],
                    m["backbone"],
                    m["method"],
                    m.get("llm"),
                    int(m["seed"]),
                    m["test"],
                )
            )
    return sorted(runs, key=lambda r: str(r.path))


def select_runs(runs: Iterable[Run], methods: Sequence[str], llm: str | None = None) -> list[Run]:
    """Runs whose method is in `methods` (and, for LLM methods, whose LLM is `llm` when given), ordered by
    the position of their method in `methods`, then LLM, then seed."""
    order = {m: i for i, m in enumerate(methods)}
    keep = [r for r in runs if r.method in order and (llm is None or r.llm is None or r.llm == llm)]
    return sorted(keep, key=lambda r: (order[r.method], r.llm or "", r.seed, str(r.path)))


def n_groups_of(test: Mapping[str, Any], protocol: str) -> int:
    """How many popularity groups a run's test metrics hold for `protocol` (0 for an old file without them)."""
    groups = [int(m.group(1)) for k in test.get(protocol, {}) if (m := _GROUP_KEY.match(k))]
    return max(groups, default=0)


# ---- Fig. 5: popularity-group bars --------------------------------------------------------------------------------
def group_stats(runs: Sequence[Run], protocol: str, metrics: Sequence[str] = METRICS) -> dict[str, dict]:
    """Mean and sample std over the seeds of ONE method, per popularity group.

    {metric: {"mean": [G floats], "std": [G floats], "seeds": [G lists of the seeds used]}}; a seed whose group is
    empty (None in metrics.json) is left out of that group; a group no seed has is NaN.
    """
    g = max((n_groups_of(r.test, protocol) for r in runs), default=0)
    out: dict[str, dict] = {}
    for metric in metrics:
        means, stds, used = [], [], []
        for i in range(1, g + 1):
            vals = [
                (r.seed, r.test[protocol][f"group{i}"][metric])
                for r in runs
                if protocol in r.test and r.test[protocol].get(f"group{i}") is not None
            ]
            x = np.array([v for _, v in vals], dtype=np.float64)
            means.append(float(x.mean()) if x.size else float("nan"))
            stds.append(float(x.std(ddof=1)) if x.size > 1 else 0.0 if x.size else float("nan"))
            used.append(sorted(s for s, _ in vals))
        out[metric] = {"mean": means, "std": stds, "seeds": used}
    return out


def group_labels(popularity: np.ndarray | None, n_groups: int) -> list[str]:
    """x tick labels: "G1" .. "Gn", with the training-count range of each group's items when `popularity` is
    known (the evaluator's grouping: `popularity_groups`)."""
    labels = [f"G{i}" for i in range(1, n_groups + 1)]
    if popularity is None:
        return labels
    groups = popularity_groups(popularity, n_groups)
    out = []
    for i, lab in enumerate(labels, start=1):
        c = np.asarray(popularity)[groups == i]
        out.append(f"{lab}\n{c.min()}–{c.max()}" if c.size else lab)
    return out


def plot_group_bars(
    runs: Sequence[Run],
    path: Path,
    protocol: str,
    metrics: Sequence[str] = METRICS,
    popularity: np.ndarray | None = None,
    title: str | None = None,
) -> dict[str, dict]:
    """Grouped bars for `runs` of one (dataset, backbone): one bar series per method label, one panel per metric.

    Writes the PNG to `path` atomically. Returns {label: {metric: {"mean", "std", "seeds"}}} where "mean" and
    "std" are read back from the drawn bars and error bars (so they are exactly what the picture shows).
    """
    by_label: dict[str, list[Run]] = {}
    for r in runs:
        by_label.setdefault(r.label, []).append(r)
    if not by_label:
        raise ValueError("plot_group_bars needs at least one run")
    stats = {lab: group_stats(rs, protocol, metrics) for lab, rs in by_label.items()}
    g = max(len(s[metrics[0]]["mean"]) for s in stats.values())
    if g == 0:
        raise ValueError(f"no popularity-group metrics for protocol {protocol!r} in these runs")

    fig = Figure(figsize=(4.6 * len(metrics) + 1.2, 4.2), layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    width = 0.8 / len(stats)
    x = np.arange(g)
    drawn: dict[str, dict] = {lab: {} for lab in stats}
    for ax, metric in zip(axes, metrics):
        for j, (lab, s) in enumerate(stats.items()):
            mean = _pad(s[metric]["mean"], g)
            std = _pad(s[metric]["std"], g)
            n_seeds = len(by_label[lab])
            bars = ax.bar(
                x + (j - (len(stats) - 1) / 2) * width,
                mean,
                width,
                yerr=std,
                capsize=3,
                label=f"{lab} ({n_seeds} seed{'s' if n_seeds != 1 else ''})",
                color=f"C{j}",
                error_kw={"elinewidth": 1},
            )
            drawn[lab][metric] = {
                "mean": [float(b.get_height()) for b in bars.patches],
                "std": _errorbar_halfwidths(bars, g),
                "seeds": s[metric]["seeds"],
            }
        ax.set_xticks(x, group_labels(popularity, g))
        ax.set_xlabel(
            "popularity group (1 = least popular)"
            + ("; training count of its items" if popularity is not None else "")
        )
        ax.set_ylabel(f"{metric} ({protocol})")
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    axes[0].legend(fontsize="small")
    if title:
        fig.suptitle(title)
    save_png(fig, path)
    return drawn


def _pad(values: Sequence[float], g: int) -> list[float]:
    return list(values) + [float("nan")] * (g - len(values))


def _errorbar_halfwidths(bars, g: int) -> list[float]:
    """Half-lengths of the error bars drawn on a BarContainer (NaN where none is drawn)."""
    eb = bars.errorbar
    if eb is None:
        return [float("nan")] * g
    segs = eb.lines[2][0].get_segments()  # one vertical segment per bar: [[x, y - e], [x, y + e]]
    return [float((s[1][1] - s[0][1]) / 2) for s in segs]


# ---- Fig. 6: 2-D maps of item tables ------------------------------------------------------------------------------
def run_item_table(run_dir: str | Path) -> torch.Tensor:
    """The effective item table (n_items + 1, H) of a saved run: what its backbone scores with.

    None / LLM2X: the trained ID table; LLMEmb and its variants: the adapter output over the frozen PCA'd LLM table
    (+ the gated ID residual where there is one), which `save_rat` stores precomputed in inference form. Row 0 is
    padding.
    """
    from training.srs import load_checkpoint

    model, _ = load_checkpoint(run_dir)
    with torch.no_grad():
        return model.item_table().detach().float().cpu().clone()


def project_2d(table: torch.Tensor) -> tuple[np.ndarray, float]:
    """PCA of rows 1..n to 2-D: coordinates (n, 2) for items 1..n and the share of variance the two keep."""
    x = table[1:].double()
    pca = PCA.fit(x, 2)
    ratio = pca.explained_variance_ratio
    return pca.transform(x).numpy(), float(ratio.sum()) if ratio is not None else float("nan")


def popularity_r2(coords: np.ndarray, counts: np.ndarray) -> float:
    """R^2 of the least-squares fit log(1 + count) ~ a + b·x + c·y: the share of log-popularity the 2-D picture
    lays out linearly (0: popularity is not a direction of the map)."""
    y = np.log1p(np.asarray(counts, dtype=np.float64))
    a = np.column_stack([np.ones(len(y)), coords])
    coef, *_ = np.linalg.lstsq(a, y, rcond=None)
    resid = y - a @ coef
    tot = float(((y - y.mean()) ** 2).sum())
    return 1.0 - float((resid**2).sum()) / tot if tot > 0 else 0.0


def plot_embedding_maps(
    tables: Mapping[str, torch.Tensor],
    popularity: np.ndarray,
    path: Path,
    title: str | None = None,
) -> dict[str, dict]:
    """One panel per table ({label: (n_items + 1, H)}), items as points at their 2-D PCA coordinates coloured by
    training count (log scale; zero counts drawn as 1). Writes the PNG to `path` atomically.

    Returns {label: {"coords": (n, 2) array, "explained": float, "r2_log_count": float}}.
    """
    if not tables:
        raise ValueError("plot_embedding_maps needs at least one table")
    counts = np.asarray(popularity)[1:]
    for lab, t in tables.items():
        if t.ndim != 2 or t.shape[0] != len(popularity):
            raise ValueError(
                f"table {lab!r} has shape {tuple(t.shape)}; the dataset has {len(popularity) - 1} items "
                "(expected (n_items + 1, H)): the run was trained on another preparation of the data"
            )
    shown = np.maximum(counts, 1)
    norm = LogNorm(vmin=1, vmax=max(int(shown.max()), 2))
    # A fixed drawing order, neither sorted by popularity (that would hide one end under the other) nor by id.
    order = np.random.default_rng(0).permutation(len(counts))
    size = float(np.clip(20_000 / max(len(counts), 1), 2, 12))  # points shrink as the catalog grows
    fig = Figure(figsize=(4.2 * len(tables) + 1.0, 4.4), layout="constrained")
    axes = fig.subplots(1, len(tables), squeeze=False)[0]
    out: dict[str, dict] = {}
    sc = None
    for ax, (lab, t) in zip(axes, tables.items()):
        coords, explained = project_2d(t)
        r2 = popularity_r2(coords, counts)
        sc = ax.scatter(
            coords[order, 0],
            coords[order, 1],
            c=shown[order],
            cmap="viridis",
            norm=norm,
            s=size,
            alpha=0.7,
            linewidths=0,
            rasterized=True,
        )
        ax.set_title(f"{lab}\nPCA keeps {explained:.0%}; R² of log count {r2:.2f}", fontsize="medium")
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
        ax.set_xticks([])
        ax.set_yticks([])
        out[lab] = {"coords": coords, "explained": explained, "r2_log_count": r2}
    bar = fig.colorbar(sc, ax=list(axes), label="training-set count (log scale)", shrink=0.9)
    bar.ax.yaxis.set_major_formatter(LogFormatter())  # "1, 10, 100" rather than "10^0, 10^1, 10^2"
    bar.ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1.2, 0.6)))
    if title:
        fig.suptitle(title)
    save_png(fig, path)
    return out


# ---- files ---------------------------------------------------------------------------------------------------------
def save_png(fig: Figure, path: str | Path) -> Path:
    """Render `fig` with Agg and write it atomically (temp sibling + rename); parents are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    atomic_write_bytes(path, buf.getvalue())
    return path


def slug(text: str) -> str:
    """A file-name part: "amazon-beauty" stays, "Foo Bar/x" -> "foo-bar-x"."""
    return re.sub(r"[^a-z0-9.]+", "-", str(text).lower()).strip("-") or "x"


def group_bars_name(dataset: str, backbone: str, protocol: str) -> str:
    return f"fig5-groups-{slug(dataset)}-{slug(backbone)}-{slug(protocol)}.png"


def embedding_map_name(dataset: str, backbone: str) -> str:
    return f"fig6-map-{slug(dataset)}-{slug(backbone)}.png"


def write_figures(
    runs: Sequence[Run],
    out_dir: str | Path = DEFAULT_OUT,
    methods: Sequence[str] = DEFAULT_METHODS,
    protocols: Sequence[str] = DEFAULT_PROTOCOLS,
    llm: str | None = None,
    popularity: Callable[[str], np.ndarray | None] | Mapping[str, np.ndarray] | None = None,
    maps: bool = True,
    map_seed: int | None = None,
    log: Callable[[str], None] = print,
) -> dict[Path, dict]:
    """Every figure the selected runs allow; returns {png path: the numbers it shows}.

    Fig. 5 for each (dataset, backbone, protocol) with group metrics. Fig. 6 for each (dataset, backbone) whose
    training counts `popularity` gives (a mapping or a function of the dataset name returning None when unknown),
    from the run of seed `map_seed` (default: each method's lowest seed) of every selected method.
    """
    out_dir = Path(out_dir)
    chosen = select_runs(runs, methods, llm)
    pop_of = popularity.get if isinstance(popularity, Mapping) else (popularity or (lambda _ds: None))
    blocks: dict[tuple[str, str], list[Run]] = {}
    for r in chosen:
        blocks.setdefault((r.dataset, r.backbone), []).append(r)
    written: dict[Path, dict] = {}
    for (ds, bb), rs in sorted(blocks.items()):
        pop = pop_of(ds)
        for protocol in protocols:
            have = [r for r in rs if n_groups_of(r.test, protocol) > 0]
            if not have:
                log(f"{ds}/{bb}: no {protocol} popularity-group metrics; Fig. 5 skipped")
                continue
            path = out_dir / group_bars_name(ds, bb, protocol)
            title = f"{ds} · {bb} · {protocol}: per popularity group, mean ± std over seeds"
            written[path] = plot_group_bars(
                have, path, protocol, popularity=_if_len(pop, have[0]), title=title
            )
            log(f"wrote {path}")
        if not maps:
            continue
        if pop is None:
            log(f"{ds}/{bb}: training counts of {ds!r} unknown; Fig. 6 skipped")
            continue
        tables: dict[str, torch.Tensor] = {}
        for lab in dict.fromkeys(r.label for r in rs):
            mine = [r for r in rs if r.label == lab]
            pick = next((r for r in mine if r.seed == map_seed), None) if map_seed is not None else mine[0]
            if pick is None:
                log(f"{ds}/{bb}/{lab}: no seed {map_seed}; left out of Fig. 6")
                continue
            if not (pick.path / "model.safetensors").is_file():
                log(f"{ds}/{bb}/{lab}: no checkpoint in {pick.path}; left out of Fig. 6")
                continue
            table = run_item_table(pick.path)
            if table.shape[0] != len(pop):
                log(
                    f"{ds}/{bb}/{lab}: table has {table.shape[0] - 1} items, the prepared {ds!r} has "
                    f"{len(pop) - 1} (another preparation of the data?); left out of Fig. 6"
                )
                continue
            tables[lab] = table
        if not tables:
            continue
        path = out_dir / embedding_map_name(ds, bb)
        seeds = f"seed {map_seed}" if map_seed is not None else "lowest seed of each method"
        title = f"{ds} · {bb}: item tables, 2-D PCA, coloured by training count ({seeds})"
        written[path] = plot_embedding_maps(tables, pop, path, title=title)
        log(f"wrote {path}")
    return written


def _if_len(pop: np.ndarray | None, run: Run) -> np.ndarray | None:
    """The counts when they belong to the run's catalog (sizes agree with its checkpoint), else None."""
    if pop is None:
        return None
    cfg = run.path / "config.json"
    if cfg.is_file():
        n = json.loads(cfg.read_text(encoding="utf-8")).get("srs_config", {}).get("n_items")
        if n is not None and n + 1 != len(pop):
            return None
    return pop
