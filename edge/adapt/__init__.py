"""Online adaptation: heads, latent replay, label matching, the learner, drift detectors, metrics.

The daemon's learner thread owns a ``Learner``; the serving thread only reads
``learner.champion`` (an immutable ``HeadSnapshot``). See docs/LEARNING.md.
"""
from edge.config import AdaptConfig
from edge.adapt.drift import ADWIN, PageHinkley
from edge.adapt.forecast import ForecastTargets
from edge.adapt.heads import HEADS, HeadSnapshot, make_head
from edge.adapt.labels import LabelMatcher, Match
from edge.adapt.learner import Learner
from edge.adapt.metrics import Prequential
from edge.adapt.optim import OptimizerSpec
from edge.adapt.promotion import PairedBlocks
from edge.adapt.reference import Reference
from edge.adapt.replay import ReplayBuffer
from edge.adapt.scaler import OnlineScaler

__all__ = ["ADWIN", "AdaptConfig", "ForecastTargets", "HEADS", "HeadSnapshot", "LabelMatcher", "Learner", "Match",
           "OnlineScaler", "OptimizerSpec", "PageHinkley", "PairedBlocks", "Prequential", "Reference", "ReplayBuffer",
           "make_head"]
