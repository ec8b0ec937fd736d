"""Figures a person would rather look at than read: learning curves, confusion, mistakes, reliability."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from pipeline.evaluate import Metrics

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

    from pipeline.calibration import Reliability


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure  # the object API needs no GUI backend

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def learning_curves(history: dict[str, list[float]]) -> Figure:
    fig = _figure(10, 4)
    epochs = np.arange(1, len(history.get("loss", [])) + 1)
    for ax, key in zip(fig.subplots(1, 2), ("loss", "accuracy"), strict=True):
        for prefix, style in (("", "-o"), ("val_", "--s")):
            if f"{prefix}{key}" in history:
                ax.plot(epochs, history[f"{prefix}{key}"], style, label="validation" if prefix else "training")
        ax.set(title=key, xlabel="epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    return fig


def confusion_matrix(metrics: Metrics) -> Figure:
    fig = _figure(7, 6)
    ax = fig.subplots()
    counts = np.asarray(metrics.confusion)
    # log colour scale: the diagonal would otherwise wash out every mistake
    image = ax.imshow(np.log1p(counts), cmap="Blues")
    for (row, col), value in np.ndenumerate(counts):
        if value:
            ax.text(col, row, str(value), ha="center", va="center", fontsize=8, color="white" if row == col else "black")
    ax.set(
        xticks=range(10),
        yticks=range(10),
        xlabel="predicted",
        ylabel="true",
        title=f"confusion on {metrics.n_images:,} test images (accuracy {metrics.accuracy:.4f})",
    )
    fig.colorbar(image, ax=ax, label="log(1 + count)")
    return fig


def per_class_scores(metrics: Metrics) -> Figure:
    fig = _figure(9, 4)
    ax = fig.subplots()
    digits = np.arange(10)
    scores = (("precision", metrics.class_precision), ("recall", metrics.class_recall), ("F1", metrics.class_f1))
    for offset, (name, values) in zip((-0.27, 0, 0.27), scores, strict=True):
        ax.bar(digits + offset, values, width=0.27, label=name)
    low = min(min(metrics.class_precision), min(metrics.class_recall), min(metrics.class_f1))
    ax.set(xticks=digits, xlabel="digit", ylim=(max(0.0, low - 0.02), 1.0), title="per-class scores on the test set")
    ax.legend(loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    return fig


def misclassified_grid(images: np.ndarray, y_true: np.ndarray, probabilities: np.ndarray, limit: int = 48) -> Figure:
    """The most confident mistakes first: those say most about the model.

    One picture of tiles on a single Axes: an Axes per mistake is slow to lay out and draw.
    """
    y_pred = probabilities.argmax(axis=1)
    mistakes = np.flatnonzero(y_pred != y_true)
    shown = mistakes[np.argsort(-probabilities[mistakes, y_pred[mistakes]])][:limit]
    columns = 8
    rows = max(1, int(np.ceil(len(shown) / columns)))
    height, width = images.shape[1:3]
    gap, label = width // 4, height * 3 // 4  # pixels around each image, and above it for its caption
    cell_width, cell_height = width + gap, height + label
    tiles = np.zeros((rows * cell_height, columns * cell_width), dtype=np.float32)
    fig = _figure(columns * 1.15, rows * 1.5 + 0.4)
    fig.suptitle(f"{len(mistakes)} misclassified test images (most confident first)")
    ax = fig.subplots()
    ax.axis("off")
    for cell, index in enumerate(shown):
        top, left = (cell // columns) * cell_height + label, (cell % columns) * cell_width + gap // 2
        tiles[top : top + height, left : left + width] = images[index].reshape(height, width)
        caption = f"true {y_true[index]} / pred {y_pred[index]}\n{probabilities[index, y_pred[index]]:.0%}"
        ax.text(left + width / 2, top - 1, caption, ha="center", va="bottom", fontsize=8)
    ax.imshow(tiles, cmap="gray_r", vmin=0, vmax=max(float(tiles.max()), 1.0), interpolation="nearest")
    return fig


def explained_mistakes(images: np.ndarray, y_true: np.ndarray, probabilities: np.ndarray, saliencies: np.ndarray) -> Figure:
    """Mistakes over two rows: each digit as the model saw it, and below it where its ink counted for the wrong answer."""
    count = len(images)
    fig = _figure(max(count, 1) * 1.3, 3.2)
    fig.suptitle("The most confident mistakes, and where the ink counted for the wrong answer (integrated gradients)")
    axes = np.asarray(fig.subplots(2, max(count, 1), squeeze=False))
    predicted = probabilities.argmax(axis=1)
    for column, ax in enumerate(axes.T):
        for a in ax:
            a.axis("off")
        if column >= count:
            continue
        ax[0].imshow(images[column], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        confidence = probabilities[column, predicted[column]]
        ax[0].set_title(f"true {y_true[column]} / pred {predicted[column]}\n{confidence:.0%}", fontsize=8)
        ax[1].imshow(images[column], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax[1].imshow(saliencies[column], cmap="inferno", alpha=np.clip(saliencies[column], 0, 1) * 0.8, interpolation="bilinear")
    return fig


def reliability_diagram(panels: dict[str, Reliability], title: str = "reliability") -> Figure:
    """One panel per set of answers (e.g. before and after calibration): accuracy against confidence per bin.

    Bars below the diagonal are over-confident; each panel's title gives its expected calibration error.
    """
    fig = _figure(5 * len(panels), 4.6)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, bins) in zip(axes, panels.items(), strict=True):
        edges = np.asarray(bins.edges)
        width = np.diff(edges)
        filled = np.asarray(bins.counts) > 0
        ax.bar(edges[:-1][filled], np.asarray(bins.accuracy)[filled], width=width[filled], align="edge", label="accuracy")
        ax.bar(
            edges[:-1][filled],
            (np.asarray(bins.confidence) - np.asarray(bins.accuracy))[filled],
            bottom=np.asarray(bins.accuracy)[filled],
            width=width[filled],
            align="edge",
            color="tab:red",
            alpha=0.35,
            label="gap to confidence",
        )
        ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="calibrated")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy", title=f"{name}: ECE {bins.ece:.4f}")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
    fig.suptitle(f"{title} ({sum(next(iter(panels.values())).counts):,} images)")
    return fig


def suite_accuracy(
    mnist: float, families: dict[str, float], champion: dict[str, float] | None = None, champion_version: str | None = None
) -> Figure:
    """Accuracy on MNIST's test set and on each family of the out-of-distribution suite, beside the champion's."""
    names = ["mnist", *families]
    values = [mnist, *families.values()]
    fig = _figure(max(8, 0.8 * len(names)), 4.5)
    ax = fig.subplots()
    x = np.arange(len(names))
    width = 0.4 if champion else 0.7
    bars = ax.bar(x - (width / 2 if champion else 0), values, width=width, label="this model")
    ax.bar_label(bars, fmt="%.2f", fontsize=7)
    if champion:
        theirs = [np.nan, *(champion.get(name, np.nan) for name in families)]
        ax.bar(x + width / 2, theirs, width=width, label=f"champion v{champion_version}", alpha=0.6)
        ax.legend(loc="lower left")
    ax.set(xticks=x, ylim=(0, 1.05), ylabel="accuracy", title="MNIST's test set and the out-of-distribution suite")
    ax.set_xticklabels(names, rotation=35, ha="right")
    ax.grid(axis="y", alpha=0.3)
    return fig


def monitoring_outputs(reference: pd.DataFrame, window: pd.DataFrame, title: str = "") -> Figure:
    """What the model said in the window beside what it said on the reference: digits, confidence, unsure answers."""
    fig = _figure(15, 4)
    digits, confidence, unsure = fig.subplots(1, 3, width_ratios=[2, 2, 1])
    x = np.arange(10)
    for offset, (name, frame) in zip((-0.2, 0.2), (("reference", reference), ("window", window)), strict=True):
        counts = np.bincount(frame["digit"].to_numpy(), minlength=10)[:10]
        digits.bar(x + offset, counts / max(len(frame), 1), width=0.4, label=f"{name} ({len(frame):,})")
    digits.set(xticks=x, xlabel="predicted digit", ylabel="share of answers", title="predicted digits")
    digits.legend()
    # confidence piles up near 1: a log scale keeps the tail of doubtful answers visible
    bins = np.linspace(0, 1, 41)
    for name, frame in (("reference", reference), ("window", window)):
        confidence.hist(frame["confidence"], bins=bins, density=True, histtype="step", linewidth=2, label=name)
    confidence.set(xlabel="confidence", yscale="log", title="confidence")
    confidence.legend(loc="upper left")
    shares = [float(reference["unsure"].mean()), float(window["unsure"].mean())]
    bars = unsure.bar(["reference", "window"], shares, color=["tab:blue", "tab:orange"])
    unsure.bar_label(bars, labels=[f"{share:.1%}" for share in shares], fontsize=8)
    unsure.set(ylim=(0, max(1e-3, *shares) * 1.25), title="share of unsure answers")
    for ax in (digits, confidence, unsure):
        ax.grid(axis="y", alpha=0.3)
    if title:
        fig.suptitle(title)
    return fig


def monitoring_inputs(reference: pd.DataFrame, window: pd.DataFrame, drifted: dict[str, bool] | None = None) -> Figure:
    """The input statistics in the window beside the reference's, one panel each; drifted ones are titled so."""
    from pipeline.image_stats import STATISTICS

    fig = _figure(16, 7)
    for ax, name in zip(fig.subplots(2, 4).ravel(), STATISTICS, strict=True):
        values = np.concatenate([reference[name].to_numpy(), window[name].to_numpy()])
        bins = np.histogram_bin_edges(values, bins=30) if np.ptp(values) > 0 else 10
        for label, frame in (("reference", reference), ("window", window)):
            ax.hist(frame[name], bins=bins, density=True, histtype="step", linewidth=2, label=label)
        moved = (drifted or {}).get(name)
        ax.set_title(f"{name}{' - DRIFT' if moved else ''}", color="tab:red" if moved else "black")
        ax.grid(alpha=0.3)
    fig.axes[0].legend()
    fig.suptitle("input statistics of the normalised digits (pipeline/image_stats.py)")
    return fig


def family_mistakes(examples: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], per_family: int = 8) -> Figure:
    """A row of mistakes per family, as the model saw them (the normalised digit): ``{family: (pixels, true, predicted)}``.

    One picture of tiles on a single Axes, like ``misclassified_grid``.
    """
    rows = max(1, len(examples))
    side, gap, label, heading = 28, 7, 21, 16
    cell_width, cell_height = side + gap, side + label
    tiles = np.zeros((rows * (cell_height + heading), per_family * cell_width), dtype=np.float32)
    fig = _figure(per_family * 1.15, rows * 1.9 + 0.4)
    fig.suptitle("mistakes on the weakest families of the suite, as the model saw them")
    ax = fig.subplots()
    ax.axis("off")
    for row, (family, (pixels, y_true, y_pred)) in enumerate(examples.items()):
        base = row * (cell_height + heading)
        ax.text(0, base + heading - 4, f"{family}: {len(pixels)} shown", ha="left", va="bottom", fontsize=9, weight="bold")
        for column, (image, true, predicted) in enumerate(zip(pixels[:per_family], y_true, y_pred, strict=False)):
            top, left = base + heading + label, column * cell_width + gap // 2
            tiles[top : top + side, left : left + side] = image
            ax.text(left + side / 2, top - 1, f"true {true}\npred {predicted}", ha="center", va="bottom", fontsize=7)
    ax.imshow(tiles, cmap="gray_r", vmin=0, vmax=max(float(tiles.max()), 1.0), interpolation="nearest")
    return fig
