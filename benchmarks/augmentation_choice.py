"""Which training augmentations: MNIST's test accuracy and the out-of-distribution suite, per configuration.

Run from the project folder:

    .venv/bin/python benchmarks/augmentation_choice.py [--configs default all] [--seeds 42] [--epochs 15] [--quick]

Every configuration trains with ``pipeline.train.train`` on the same split and seed(s), in this
process one after the other; each model is then scored on MNIST's test set and on every family of
the suite (``pipeline.suite``, rendered from MNIST's test images, through the service's photo path,
normalised once for all configurations). Ratios are against ``default`` (params.yaml as it is)
trained with the same seed in the same run. Nothing here asserts: it prints a table and writes JSON.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from harness import RESULTS, accuracy, command_line, say, suite_accuracies, suite_families, table, write_results

from pipeline.data import has_dataset, ingest, load_dataset
from pipeline.params import load_params

OUTPUT = RESULTS / "augmentation_choice.json"
# each configuration: params.yaml plus these model.* overrides
CONFIGS: dict[str, dict[str, float]] = {
    "default": {},
    "geometry": {"model.augment_rotation": 15.0, "model.augment_zoom": 0.1, "model.augment_shear": 0.15},
    "stroke": {"model.augment_stroke": 0.5},
    "pen": {"model.augment_stroke": 0.5, "model.augment_blur": 0.3, "model.augment_noise": 0.05},
    "all": {
        "model.augment_rotation": 15.0,
        "model.augment_zoom": 0.1,
        "model.augment_shear": 0.15,
        "model.augment_elastic": 0.3,
        "model.augment_stroke": 0.5,
        "model.augment_blur": 0.3,
        "model.augment_noise": 0.05,
    },
}


def main() -> None:
    parser = command_line(__doc__, OUTPUT, "a 2-epoch run on 10,000 images with 100 per family, to check the script")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[42])
    parser.add_argument("--epochs", type=int, default=None, help="default: train.epochs of params.yaml")
    parser.add_argument("--suite-size", type=int, default=1000)
    args = parser.parse_args()

    from pipeline.train import compiled_predictor, train

    base = load_params(Path("params.yaml"))
    if not has_dataset(Path("data")):
        ingest(base.data, Path("data"), Path(".cache"))
    dataset = load_dataset(Path("data"))
    size = 100 if args.quick else args.suite_size
    if args.quick:
        dataset = dataset.head(10_000, 10_000)
    families = suite_families(dataset.x_test, dataset.y_test, size)

    rows = []
    for seed in args.seeds:
        for name in args.configs:
            overrides = {**CONFIGS[name], "train.seed": seed}
            if args.epochs or args.quick:
                overrides["train.epochs"] = 2 if args.quick else args.epochs
            params = load_params(Path("params.yaml"), overrides)
            say(f"{name}, seed {seed}: {params.train.epochs} epochs")
            result = train(dataset, params)
            predict = compiled_predictor(result.model)

            scores = suite_accuracies(predict, families)
            row = {
                "config": name,
                "seed": seed,
                "train_seconds": round(result.seconds, 1),
                "mnist": accuracy(predict, dataset.x_test, dataset.y_test),
                "families": scores,
                "suite_mean": statistics.mean(scores.values()),
            }
            say(f"  mnist {row['mnist']:.4f}, suite mean {row['suite_mean']:.4f}, {row['train_seconds']:.0f} s of training")
            rows.append(row)

    names = list(families)
    columns = [("config", "<9"), ("seed", ">4"), ("train s", ">7"), ("mnist", ">6"), ("suite mean", ">10")]
    columns += [(n, f">{max(len(n), 5)}") for n in names]
    print(
        table(
            columns,
            [
                (r["config"], r["seed"], f"{r['train_seconds']:.0f}", f"{r['mnist']:.4f}", f"{r['suite_mean']:.4f}")
                + tuple(f"{r['families'][n]:.3f}" for n in names)
                for r in rows
            ],
        )
    )
    for seed in args.seeds:
        default = next((r for r in rows if r["config"] == "default" and r["seed"] == seed), None)
        for r in rows:
            if default and r["seed"] == seed and r is not default:
                say(
                    f"{r['config']} vs default (seed {seed}): mnist {r['mnist'] - default['mnist']:+.4f}, "
                    f"suite mean {r['suite_mean'] / default['suite_mean']:.3f}x, "
                    f"photographed {r['families']['photographed'] - default['families']['photographed']:+.4f}, "
                    f"training time {r['train_seconds'] / default['train_seconds']:.2f}x"
                )
    write_results(args.output, "augmentation_choice", configs=CONFIGS, suite_size=size, runs=rows)


if __name__ == "__main__":
    main()
