"""The runnable examples in the docstrings of the pure parts are tests too."""
from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["edge.adapt.heads", "edge.adapt.adam", "edge.adapt.replay", "edge.adapt.metrics", "edge.adapt.drift", "edge.adapt.labels",
           "edge.adapt.forecast", "edge.adapt.budget", "edge.adapt.synth", "edge.state",
           "edge.adapt.worker", "edge.adapt.optim", "edge.adapt.promotion", "edge.adapt.reference", "edge.adapt.scaler",
           "edge.learning", "edge.adapt.rowscore", "edge.adapt.policy", "edge.adapt.guard"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    result = doctest.testmod(importlib.import_module(name))
    assert result.failed == 0 and result.attempted > 0
