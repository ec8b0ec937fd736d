"""Evaluation metrics computed here, not by MLflow's default evaluator (it mishandles image models)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

N_CLASSES = 10


@dataclass(frozen=True)
class Metrics:
    accuracy: float
    class_precision: tuple[float, ...]
    class_recall: tuple[float, ...]
    class_f1: tuple[float, ...]
    confusion: tuple[tuple[int, ...], ...]  # rows: true label, columns: predicted
    n_images: int

    @property
    def min_class_recall(self) -> float:
        return min(self.class_recall)

    @property
    def weakest_class(self) -> int:
        return int(np.argmin(self.class_recall))

    def flat(self, prefix: str = "test_") -> dict[str, float]:
        """Scalar metrics for ``mlflow.log_metrics``."""
        out = {f"{prefix}accuracy": self.accuracy, f"{prefix}min_class_recall": self.min_class_recall}
        for digit in range(N_CLASSES):
            out[f"{prefix}recall_{digit}"] = self.class_recall[digit]
            out[f"{prefix}precision_{digit}"] = self.class_precision[digit]
            out[f"{prefix}f1_{digit}"] = self.class_f1[digit]
        return out

    def to_dict(self) -> dict:
        return asdict(self)


def compute_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> Metrics:
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    if y_true.shape != y_pred.shape or y_true.size == 0:
        raise ValueError(f"need equal, non-empty label arrays; got {y_true.shape} and {y_pred.shape}")
    confusion = np.zeros((N_CLASSES, N_CLASSES), dtype=np.int64)
    np.add.at(confusion, (y_true, y_pred), 1)
    true_pos = np.diag(confusion).astype(np.float64)
    support, predicted = confusion.sum(axis=1), confusion.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = np.where(support > 0, true_pos / support, 0.0)
        precision = np.where(predicted > 0, true_pos / predicted, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    return Metrics(
        accuracy=float(true_pos.sum() / y_true.size),
        class_precision=tuple(float(v) for v in precision),
        class_recall=tuple(float(v) for v in recall),
        class_f1=tuple(float(v) for v in f1),
        confusion=tuple(tuple(int(v) for v in row) for row in confusion),
        n_images=int(y_true.size),
    )


def predict_classes(model, x: np.ndarray, batch_size: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities and predicted digits for uint8 images, in batches through a compiled call.

    ``model`` is anything callable on a float32 (n, 28, 28, 1) batch returning probabilities:
    a Keras model or an MLflow pyfunc's ``predict`` wrapped by the caller.
    """
    from pipeline.preprocess import to_model_input

    probabilities = np.concatenate(
        [np.asarray(model(to_model_input(x[i : i + batch_size]))) for i in range(0, len(x), batch_size)]
    )
    return probabilities, probabilities.argmax(axis=1)
