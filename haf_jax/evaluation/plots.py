"""Evaluation pictures as matplotlib Figures: reliability diagram, reward histograms, reward vs
length, and the out-of-distribution accuracy heatmap.

Figures are built with the object API (`matplotlib.figure.Figure`, Agg canvas), never pyplot: no
global state, no display needed, safe inside the training loop. `haf_jax.evaluate` saves them as
PNG; the training loop sends them to TensorBoard (metrics.MetricsLog.write_figures). The numbers
drawn come from losses.py (the same ones the reports print).
"""

from __future__ import annotations

import numpy as np

from haf_jax.core import losses


def _figure(width: float = 6.0, height: float = 4.5, ncols: int = 1):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    axes = fig.subplots(1, ncols)
    return fig, axes


def reliability_diagram(margin_N, *, title: str = "", n_bins: int = losses.ECE_BINS):
    """Accuracy vs confidence of P(chosen > rejected) = sigmoid(margin), per equal-width bin, with
    the diagonal of perfect calibration and the pair count per bin; the title carries the ECE."""
    cal = {k: np.asarray(v) for k, v in losses.calibration(margin_N, n_bins=n_bins).items()}
    fig, ax = _figure()
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    used = cal["bin_count"] > 0
    ax.bar(
        edges[:-1][used],
        cal["bin_accuracy"][used],
        width=1.0 / n_bins,
        align="edge",
        alpha=0.7,
        edgecolor="black",
        label="accuracy in bin",
    )
    ax.plot(
        cal["bin_confidence"][used], cal["bin_accuracy"][used], "o", color="tab:red", label="mean confidence in bin"
    )
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    for left, acc, count in zip(edges[:-1][used], cal["bin_accuracy"][used], cal["bin_count"][used]):
        ax.annotate(f"{int(count)}", (left + 0.5 / n_bins, min(float(acc), 0.97) + 0.015), ha="center", fontsize=7)
    ax.set_xlim(0.45, 1.0)
    ax.set_ylim(0.0, 1.05)
    ax.set_xlabel("confidence: max(p, 1 - p), p = sigmoid(r_chosen - r_rejected)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title}  ECE ({n_bins} bins) = {float(cal['ece']):.4f}".strip())
    ax.legend(loc="upper left", fontsize=8)
    return fig


def reward_histograms(reward_Nx2, *, title: str = "", bins: int = 30):
    """Left: histograms of the chosen and of the rejected rewards; right: of the margins r_c - r_r."""
    reward_Nx2 = np.asarray(reward_Nx2, np.float64)
    fig, (left, right) = _figure(10.0, 4.0, ncols=2)
    lo, hi = (float(reward_Nx2.min()), float(reward_Nx2.max())) if reward_Nx2.size else (0.0, 1.0)
    edges = np.linspace(lo, hi if hi > lo else lo + 1e-6, bins + 1)
    left.hist(reward_Nx2[:, 0], bins=edges, alpha=0.6, label="chosen", color="tab:green")
    left.hist(reward_Nx2[:, 1], bins=edges, alpha=0.6, label="rejected", color="tab:red")
    left.set_xlabel("reward")
    left.set_ylabel("responses")
    left.legend(fontsize=8)
    left.set_title(f"{title} rewards".strip())
    margin_N = reward_Nx2[:, 0] - reward_Nx2[:, 1]
    right.hist(margin_N, bins=bins, color="tab:blue", alpha=0.8)
    right.axvline(0.0, color="black", linestyle="--")
    right.set_xlabel("reward margin r_chosen - r_rejected")
    right.set_ylabel("pairs")
    right.set_title(f"margin > 0 on {float(np.mean(margin_N > 0)) if margin_N.size else 0.0:.1%} of pairs")
    return fig


def reward_vs_length(reward_Nx2, n_tokens_Nx2, *, title: str = ""):
    """Scatter of reward against response length (tokens), chosen and rejected apart; the title
    carries the Pearson correlation over all responses."""
    reward_Nx2, n_tokens_Nx2 = np.asarray(reward_Nx2), np.asarray(n_tokens_Nx2)
    fig, ax = _figure()
    ax.scatter(n_tokens_Nx2[:, 0], reward_Nx2[:, 0], s=8, alpha=0.6, label="chosen", color="tab:green")
    ax.scatter(n_tokens_Nx2[:, 1], reward_Nx2[:, 1], s=8, alpha=0.6, label="rejected", color="tab:red")
    corr = float(losses.pearson(reward_Nx2.reshape(-1), n_tokens_Nx2.reshape(-1))) if reward_Nx2.size else float("nan")
    ax.set_xlabel("response length (tokens)")
    ax.set_ylabel("reward")
    ax.set_title(f"{title}  Pearson r = {corr:.3f}".strip())
    ax.legend(fontsize=8)
    return fig


def accuracy_heatmap(matrix_RxC, rows: list[str], cols: list[str], *, title: str = "reward accuracy"):
    """Train-on-row / test-on-column accuracy grid (NaN cells blank), values written in the cells."""
    matrix_RxC = np.asarray(matrix_RxC, np.float64)
    fig, ax = _figure(1.8 + 1.3 * len(cols), 1.5 + 0.6 * len(rows))
    image = ax.imshow(np.ma.masked_invalid(matrix_RxC), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(cols)), labels=cols, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), labels=rows)
    for i in range(len(rows)):
        for j in range(len(cols)):
            if np.isfinite(matrix_RxC[i, j]):
                ax.text(
                    j,
                    i,
                    f"{matrix_RxC[i, j]:.3f}",
                    ha="center",
                    va="center",
                    color="white" if matrix_RxC[i, j] < 0.6 else "black",
                    fontsize=9,
                )
    ax.set_xlabel("test data")
    ax.set_ylabel("model (trained on)")
    ax.set_title(title)
    fig.colorbar(image, ax=ax)
    return fig


def eval_figures(scores: dict, *, title: str = "") -> dict:
    """{name: Figure} for per-pair scores ({reward_Nx2, n_tokens_Nx2, ...}); empty without a reward."""
    if "reward" not in scores or not len(scores["reward"]):
        return {}
    reward = scores["reward"]
    return {
        "reliability": reliability_diagram(reward[:, 0] - reward[:, 1], title=title),
        "reward_histograms": reward_histograms(reward, title=title),
        "reward_vs_length": reward_vs_length(reward, scores["n_tokens"], title=title),
    }


def to_rgb(fig) -> np.ndarray:
    """The figure rendered to a uint8 [H, W, 3] image (for TensorBoard); the figure is released."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    image = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    fig.clear()
    return image


def save(fig, path) -> None:
    """PNG at `path` (local or a URL such as gs://...); the figure is released afterwards."""
    import io

    from haf_jax.core import paths

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    fig.clear()
    paths.write_bytes(path, buf.getvalue())
