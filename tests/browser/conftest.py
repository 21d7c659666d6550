"""Browser tests: opt-in. They run only with ANATOMASK_BROWSER=1 (set by `make test-browser`), else they are skipped."""

import os

import pytest

ENABLED = os.environ.get("ANATOMASK_BROWSER") == "1"


def pytest_configure(config):
    config.addinivalue_line("markers", "browser: drives JupyterLab in headless Chromium (make test-browser)")


def pytest_collection_modifyitems(config, items):
    if ENABLED:
        return
    skip = pytest.mark.skip(reason="browser test: run `make test-browser` (sets ANATOMASK_BROWSER=1)")
    for item in items:
        if "browser" in item.keywords:
            item.add_marker(skip)
