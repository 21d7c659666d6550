"""Shared fixtures: a tiny phantom cohort, generated and prepared once per test session."""

from __future__ import annotations

import pytest


@pytest.fixture
def one_thread():
    """One intra-op thread per test (restored after): 2 threads per pytest-xdist worker on 2 cores oversubscribe."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


TINY_CLASSES = ["liver", "spleen", "kidney_left", "kidney_right", "aorta"]


@pytest.fixture(scope="session")
def phantom_release(tmp_path_factory):
    """8 phantom cases of 48x48x40 voxels at 4 x 4 x 5 mm in the TotalSegmentator release layout."""
    from anatomask_lab.data.phantom import generate_cohort

    out = tmp_path_factory.mktemp("phantom_release")
    generate_cohort(out, 8, seed=0, shape=(48, 48, 40), spacing=(4.0, 4.0, 5.0), workers=1, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_dataset(phantom_release, tmp_path_factory):
    """The cohort prepared at 4 mm with 5 organ classes (about 48^3 voxels per case): 6 train, 1 val, 1 test."""
    from anatomask_lab.data.prepare import totalsegmentator

    out = tmp_path_factory.mktemp("phantom_prepared")
    totalsegmentator.prepare(phantom_release, out, classes=TINY_CLASSES, spacing=(4.0, 4.0, 4.0), workers=1,
                             progress=False)
    return out


def _spconv_importable() -> bool:
    import warnings

    try:
        with warnings.catch_warnings():  # spconv 2.3 and its build helpers use deprecated APIs
            warnings.simplefilter("ignore")
            import spconv.pytorch  # noqa: F401
    except ImportError:
        return False
    return True


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need CUDA and tests marked ``needs_spconv`` need spconv: skip them cleanly without."""
    import torch

    skips = {}
    if not torch.cuda.is_available():
        skips["gpu"] = pytest.mark.skip(reason="needs a CUDA device")
    if any("needs_spconv" in item.keywords for item in items) and not _spconv_importable():
        skips["needs_spconv"] = pytest.mark.skip(reason="needs spconv (spconv.pytorch does not import)")
    for item in items:
        for keyword, skip in skips.items():
            if keyword in item.keywords:
                item.add_marker(skip)
