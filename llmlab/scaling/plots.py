"""The sweep's pictures: isoFLOP curves with their minima, the compute-optimal frontier with the prediction,
the parametric fit's contours, and the emergence ledger. Each function takes pyplot (`llmlab.report.pyplot()`)
and the JSON the `llmlab scale` actions wrote, and returns the PNG's file name."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from llmlab.scaling.emergence import frontier


def _log_x(plt, ax) -> None:
    """A log x-axis labelled at powers of ten only (minor labels collide on these short ranges)."""
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(plt.NullFormatter())


def _n_opt(para: dict, C: np.ndarray) -> np.ndarray | None:
    """The parametric fit's N_opt(C); None where its exponents give no optimum (alpha or beta <= 0)."""
    if para["alpha"] <= 0 or para["beta"] <= 0:
        return None
    G = (para["alpha"] * para["A"] / (para["beta"] * para["B"])) ** (1 / (para["alpha"] + para["beta"]))
    return G * (C / 6) ** para["a"]


def _colors(plt, n: int) -> list:
    return [plt.cm.viridis(x) for x in np.linspace(0.05, 0.85, max(n, 1))]


def isoflop(plt, out: Path, rows: list[dict], summary: dict, prediction: dict | None) -> str:
    """Loss against N per budget, each budget's fitted parabola and its minimum (approach 2)."""
    budgets = sorted({r["budget"] for r in rows})
    fits = {round(b["C"] / budgets[0], 3): b for b in summary.get("isoflop", {}).get("budgets", [])}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for color, c in zip(_colors(plt, len(budgets)), budgets):
        pts = sorted((r["params"], r["loss"]) for r in rows if r["budget"] == c)
        ax.plot(*zip(*pts), "o", color=color, label=f"C = {c:.1e}")
        b = fits.get(round(c / budgets[0], 3))
        if b:
            n = np.geomspace(pts[0][0] / 1.3, pts[-1][0] * 1.3, 100)
            c0, c1, c2 = b["coeffs"]
            ax.plot(n, c0 + c1 * np.log(n) + c2 * np.log(n) ** 2, "-", color=color, alpha=0.6)
            if b["status"] == "ok":
                ax.plot(b["N_opt"], b["L_opt"], "*", color=color, markersize=14, markeredgecolor="k")
    if prediction and "measured_loss" in prediction:
        ax.plot(prediction["params"], prediction["measured_loss"], "D", color="tab:red",
                label=f"predicted run, C = {prediction['budget']:.1e}")
        ax.plot(prediction["params"], prediction["predicted_loss"], "x", color="tab:red", markersize=10, label="its prediction")
    _log_x(plt, ax)
    ax.set(xlabel="parameters N (without the input embedding)", ylabel="validation loss (nats/token)",
           title="IsoFLOP curves: a parabola per budget, its minimum starred")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "isoflop.png", dpi=120)
    plt.close(fig)
    return "isoflop.png"


def frontier_plot(plt, out: Path, rows: list[dict], summary: dict, prediction: dict | None) -> str:
    """N_opt(C) from the parabolas and from the parametric fit, with Chinchilla's and Kaplan's slopes for
    reference; and the loss along the compute-optimal frontier, with the predicted run."""
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    para = summary["parametric"]
    budgets = sorted({r["budget"] for r in rows})
    top = max(budgets + ([prediction["budget"]] if prediction else []))
    C = np.geomspace(budgets[0] / 2, top * 2, 50)
    n_para = _n_opt(para, C)
    if n_para is not None:
        ax.plot(C, n_para, "-", color="tab:blue", label=f"approach 3: a = {para['a']:.2f}")
    iso = summary.get("isoflop")
    if iso and "error" not in iso:
        ok = [b for b in iso["budgets"] if b["status"] == "ok"]
        ax.plot([b["C"] for b in ok], [b["N_opt"] for b in ok], "o", color="tab:orange")
        ax.plot(C, iso["k_n"] * C ** iso["a"], "--", color="tab:orange", label=f"approach 2: a = {iso['a']:.2f}")
    mid = n_para[len(C) // 2] if n_para is not None else float(np.median([r["params"] for r in rows]))
    for a, name, style in ((0.5, "Chinchilla 0.5", ":"), (0.73, "Kaplan 0.73", "-.")):
        ax.plot(C, mid * (C / C[len(C) // 2]) ** a, style, color="gray", label=name)
    ax.set(xscale="log", yscale="log", xlabel="compute C = 6ND (FLOPs)", ylabel="compute-optimal N",
           title="Compute-optimal model size")
    ax.legend(fontsize=8)
    best = frontier(rows)
    ax2.plot([r["flops"] for r in rows], [r["loss"] for r in rows], ".", color="lightgray", label="every run")
    ax2.plot([r["flops"] for r in best], [r["loss"] for r in best], "o-", color="tab:blue", label="best run per budget")
    if n_para is not None:
        d_para = C / (6 * n_para)
        ax2.plot(C, para["E"] + para["A"] / n_para ** para["alpha"] + para["B"] / d_para ** para["beta"], "--",
                 color="tab:blue", alpha=0.6, label="fit at the optimum")
    if prediction and "measured_loss" in prediction:
        ax2.plot(prediction["budget"], prediction["predicted_loss"], "x", color="tab:red", markersize=10, label="predicted")
        ax2.plot(prediction["budget"], prediction["measured_loss"], "D", color="tab:red",
                 label=f"measured ({100 * prediction['error']:+.1f}%)")
    ax2.set(xscale="log", xlabel="compute C (FLOPs)", ylabel="validation loss (nats/token)", title="Loss along the frontier")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "frontier.png", dpi=120)
    plt.close(fig)
    return "frontier.png"


def contours(plt, out: Path, rows: list[dict], summary: dict) -> str:
    """The parametric fit's loss over (N, D), the runs on it and the compute-optimal line."""
    para = summary["parametric"]
    N = np.geomspace(min(r["params"] for r in rows) / 2, max(r["params"] for r in rows) * 4, 120)
    D = np.geomspace(min(r["tokens"] for r in rows) / 2, max(r["tokens"] for r in rows) * 4, 120)
    NN, DD = np.meshgrid(N, D)
    L = para["E"] + para["A"] / NN ** para["alpha"] + para["B"] / DD ** para["beta"]
    fig, ax = plt.subplots(figsize=(6.5, 5))
    cs = ax.contour(NN, DD, L, levels=12, cmap="viridis")
    ax.clabel(cs, fontsize=7)
    ax.scatter([r["params"] for r in rows], [r["tokens"] for r in rows], c=[r["loss"] for r in rows], cmap="viridis",
               edgecolors="k", zorder=3)
    Cs = np.geomspace(6 * N[0] * D[0], 6 * N[-1] * D[-1], 50)
    n_opt = _n_opt(para, Cs)
    if n_opt is not None:
        ax.plot(n_opt, Cs / (6 * n_opt), "r--", label="compute-optimal")
        ax.legend(fontsize=8)
    ax.set(xscale="log", yscale="log", xlim=(N[0], N[-1]), ylim=(D[0], D[-1]), xlabel="parameters N", ylabel="tokens D",
           title=f"L = {para['E']:.3g} + {para['A']:.3g}/N^{para['alpha']:.2f} + {para['B']:.3g}/D^{para['beta']:.2f}")
    fig.tight_layout()
    fig.savefig(out / "contours.png", dpi=120)
    plt.close(fig)
    return "contours.png"


def ledger_plot(plt, out: Path, ledger: dict) -> str:
    """Per ability: exact match (top) and log p(answer) (bottom) against compute, every run as a dot and the
    frontier as a line."""
    abilities = list(ledger["verdicts"])
    runs = list(ledger["runs"].values())
    front = [ledger["runs"][n] for n in ledger["frontier"]]
    fig, axes = plt.subplots(2, len(abilities), figsize=(2.3 * len(abilities), 5), sharex=True, squeeze=False)
    for j, ability in enumerate(abilities):
        for i, metric in enumerate(("exact", "logprob")):
            ax = axes[i, j]
            ax.plot([r["row"]["flops"] for r in runs], [r["abilities"][ability][metric] for r in runs], ".",
                    color="lightgray")
            ax.plot([r["row"]["flops"] for r in front], [r["abilities"][ability][metric] for r in front], "o-",
                    color="tab:red" if ledger["verdicts"][ability]["kind"] in ("mirage", "jump") else "tab:blue")
            _log_x(plt, ax)
            if i == 0:
                ax.set_title(ability, fontsize=8)
                ax.set_ylim(-0.05, 1.05)
            else:
                ax.set_xlabel("C (FLOPs)", fontsize=8)
            ax.tick_params(labelsize=7)
        axes[0, 0].set_ylabel("exact match")
        axes[1, 0].set_ylabel("log p(answer), nats")
    fig.suptitle("The emergence ledger: exact match (top) and log-probability of the right answer (bottom)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "ledger.png", dpi=120)
    plt.close(fig)
    return "ledger.png"


def write_all(plt, out: Path, rows: list[dict], summary: dict, prediction: dict | None, ledger: dict | None) -> list[str]:
    names = [isoflop(plt, out, rows, summary, prediction), frontier_plot(plt, out, rows, summary, prediction),
             contours(plt, out, rows, summary)]
    if ledger and ledger.get("verdicts"):
        names.append(ledger_plot(plt, out, ledger))
    return names
