"""How well do the IRT estimators predict a merge's full-split accuracy from a few items?

Reproduce (about 10 minutes on 2 cores with the zoo cached; evaluations are stored and reused):

    python experiments/estimator_study/study.py --merges 120

Evaluates the base, the three zoo experts and ``--merges`` random merges of the demo search space on the
whole search split of the zoo's three tasks (600 items), through the same workers and store as a run
(``kind="calibration"``). The random merges are split in half: item parameters are fitted on the
endpoints and the first half; each estimator then predicts the mean accuracy over all 600 items of
every merge of the other half from n items, for n in 10, 12 (a 50x reduction), 20, 50, 100, and each
item selection. Reported: mean absolute error and Spearman rank correlation against the true accuracy;
``random`` selection is averaged over 5 draws. Writes ``results.md`` and ``mae.png`` beside this file.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

from evomerge import irt  # noqa: E402
from evomerge.calibration import calibrate, calibration_genomes, columns, response_matrix  # noqa: E402
from evomerge.config import load_config  # noqa: E402
from evomerge.search import Search  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SIZES = (10, 12, 20, 50, 100)


def collect(merges: int, workers: int, run_dir: Path) -> tuple[np.ndarray, np.ndarray, int, float]:
    """(subjects x 600 responses with the 4 endpoints first, the merges' genomes, endpoints, evaluation
    worker-seconds)."""
    cfg = load_config(
        ROOT / "experiments" / "demo.yaml",
        out=str(run_dir),
        workers=workers,
        **{"fitness.calibration.random_merges": merges},
    )
    search = Search(cfg)
    with search.session(resume=(run_dir / "store.sqlite").exists()):
        n_items = search.pool.call("n_items", cfg.fitness.search_split)
        subjects = calibrate(search.evals, search.space, search.experts, cfg)
    y = response_matrix([c.responses for c in subjects], columns(n_items, "mean"))
    genomes = np.array(calibration_genomes(search.space, cfg.seed, merges))
    return y, genomes, 1 + len(cfg.models.experts), sum(c.wall_s for c in subjects)


def study(
    y: np.ndarray, genomes: np.ndarray, n_ends: int, model: str, seed: int = 0
) -> tuple[pd.DataFrame, float]:
    rng = np.random.default_rng(seed)
    merges = rng.permutation(np.arange(n_ends, len(y)))
    train, test = merges[: len(merges) // 2], merges[len(merges) // 2 :]
    started = time.perf_counter()
    params = irt.fit_irt(y[np.r_[np.arange(n_ends), train]], model=model, seed=seed)
    fit_s = time.perf_counter() - started
    # sgpirt's surrogate: accuracy over genomes, fitted on the same training merges
    surrogate = irt.fit_surrogate(genomes[train - n_ends], y[train].mean(1), seed)
    priors = {j: surrogate.predict(genomes[j - n_ends]) for j in test}
    alone = np.array([priors[j][0] for j in test])  # the surrogate with no items at all
    everything = np.arange(y.shape[1])
    ends = np.stack([irt.fit_ability(params, everything, y[j]) for j in range(n_ends)])
    truth = y[test].mean(1)
    rows = []
    for n in SIZES:
        for selection in irt.SELECTORS:
            draws = 5 if selection == "random" else 1
            subsets = [irt.select_items(params, n, selection, seed=s) for s in range(draws)]
            for estimator in irt.ESTIMATORS:
                maes, rhos = [], []
                for idx in subsets:
                    w = irt.anchor_weights(params, idx) if selection == "anchor" else None
                    est = np.array(
                        [
                            irt.estimate_accuracy(params, idx, y[j, idx], estimator, ends, w, priors[j])
                            for j in test
                        ]
                    )
                    maes.append(np.abs(est - truth).mean())
                    rhos.append(spearmanr(est, truth).statistic)
                rows.append(
                    {
                        "model": model,
                        "items": n,
                        "reduction": f"{y.shape[1] / n:.0f}x",
                        "selection": selection,
                        "estimator": estimator,
                        "MAE": float(np.mean(maes)),
                        "Spearman": float(np.mean(rhos)),
                    }
                )
    truth = y[test].mean(1)
    rows.append(
        {
            "model": model,
            "items": 0,
            "reduction": "-",
            "selection": "-",
            "estimator": "surrogate alone",
            "MAE": float(np.abs(alone - truth).mean()),
            "Spearman": float(spearmanr(alone, truth).statistic),
        }
    )
    return pd.DataFrame(rows), fit_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--merges", type=int, default=120)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "estimator_study")
    args = ap.parse_args()
    y, genomes, n_ends, eval_s = collect(args.merges, args.workers, args.run_dir)
    frames, fits = [], {}
    for model in irt.MODELS:
        df, fits[model] = study(y, genomes, n_ends, model)
        frames.append(df)
    df = pd.concat(frames)
    alone = df[df.estimator == "surrogate alone"]
    df = df[df.estimator != "surrogate alone"]
    top = (
        df.sort_values("MAE")
        .groupby("items", as_index=False)
        .first()[["items", "reduction", "model", "selection", "estimator", "MAE", "Spearman"]]
    )
    plain = df[(df.selection == "random") & (df.estimator == "mean") & (df.model == "2pl")][
        ["items", "MAE", "Spearman"]
    ].rename(columns={"MAE": "plain mean MAE", "Spearman": "plain mean Spearman"})
    top = top.merge(plain, on="items")
    lines = [
        f"Reproduce: `python experiments/estimator_study/study.py --merges {args.merges}`",
        "",
        f"{len(y)} models ({n_ends} endpoints + {len(y) - n_ends} random merges) x {y.shape[1]} items; "
        f"evaluation {eval_s:.0f} worker-seconds; IRT fit {fits['2pl']:.0f} s (2pl), "
        f"{fits['multidim_2pl']:.0f} s (multidim_2pl). True mean accuracy of the test merges: "
        f"{y[n_ends:].mean(1).min():.3f} to {y[n_ends:].mean(1).max():.3f}.",
        "",
        "Best estimator per subset size, against the plain mean of random items:",
        "",
        top.to_markdown(index=False, floatfmt=".3f"),
        "",
        "sgpirt's surrogate alone (its prediction from the genome, no items evaluated): MAE "
        f"{alone.MAE.iloc[0]:.3f}, Spearman {alone.Spearman.iloc[0]:.3f}.",
        "",
        "Every estimator (2pl, information selection):",
        "",
        df[(df.model == "2pl") & (df.selection == "information")]
        .pivot(index="estimator", columns="items", values="MAE")
        .to_markdown(floatfmt=".3f"),
        "",
        "All rows:",
        "",
        df.to_markdown(index=False, floatfmt=".3f"),
    ]
    (HERE / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:14]))
    fig, ax = plt.subplots(figsize=(6, 4))
    sub = df[df.model == "2pl"]
    for (selection, estimator), g in sub.groupby(["selection", "estimator"]):
        if estimator in ("mean", "gpirt", "gmpirt", "sgpirt") and selection in ("random", "information"):
            ax.plot(g["items"], g["MAE"], marker="o", label=f"{estimator}, {selection}")
    ax.axhline(0.02, color="grey", ls="--", lw=1)
    ax.set(
        xscale="log",
        xlabel="items evaluated (of 600)",
        ylabel="MAE of full-split accuracy",
        title="zoo merges",
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(HERE / "mae.png", dpi=120)


if __name__ == "__main__":
    main()
