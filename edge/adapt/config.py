"""``AdaptConfig``: every knob of online adaptation, typed and closed.

The lead's ``edge.config`` maps the ``[adapt]`` section onto this dataclass with
``AdaptConfig.from_dict``; an unknown key or a bad value raises ``ConfigError`` naming
the key, the value and what is allowed.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from edge.errors import ConfigError

_CHOICES = {
    "head": ("linear", "lowrank", "mlp"),
    "optimizer": ("adam", "sgd"),
    "drift_detector": ("page_hinkley", "adwin", "both", "none"),
    "drift_on": ("loss", "error"),
}


@dataclass
class AdaptConfig:
    """Online adaptation settings; defaults suit a 64-128 feature head on one CPU core.

    Learning: ``lr``, ``optimizer``, ``batch`` (the new sample plus ``batch - 1`` replayed
    ones), ``steps_per_label``, ``replay_bytes`` (bound of the latent replay buffer),
    ``anchor`` (L2 strength pulling the head toward the fleet's global head).

    Champion/challenger: the challenger is promoted when its mean prequential loss over
    the last ``eval_window`` labels is below the champion's by the relative
    ``promote_margin``, with at least ``eval_min`` labels seen since the last swap; the
    champion is rolled back to the global head when its loss exceeds the global head's
    by ``rollback_margin``.

    Budget: at most ``budget_steps_per_s`` training steps per second and
    ``budget_cpu_share`` of one core; labels past the budget are still scored and kept
    for replay, only their training steps are skipped (and counted).

    Drift: ``drift_detector`` watches the champion's prequential ``drift_on`` (loss or
    0/1 error). On drift, for the next ``boost_labels`` labels the learning rate is
    multiplied by ``boost_lr``, the steps per label by ``boost_steps``, and promotion
    needs only ``eval_min // 2`` fresh labels (see docs/LEARNING.md, "Drift policy").
    """

    head: str = "linear"
    head_options: dict = field(default_factory=dict)
    optimizer: str = "adam"
    lr: float = 0.005
    batch: int = 32
    steps_per_label: int = 1
    replay_bytes: int = 1 << 20
    recent_share: float = 0.25
    anchor: float = 1e-3
    promote_margin: float = 0.05
    rollback_margin: float = 0.10
    eval_window: int = 100
    eval_min: int = 40
    budget_steps_per_s: float = 500.0
    budget_cpu_share: float = 0.5
    drift_detector: str = "both"
    drift_on: str = "error"
    ph_threshold: float = 4.0
    ph_delta: float = 0.03
    adwin_delta: float = 0.002
    boost_labels: int = 200
    boost_lr: float = 3.0
    boost_steps: int = 2
    seed: int = 0

    def __post_init__(self):
        for k, allowed in _CHOICES.items():
            v = getattr(self, k)
            if v not in allowed:
                raise ConfigError(f"[adapt] {k} = {v!r}: must be one of {', '.join(allowed)}")
        for k in ("lr", "batch", "steps_per_label", "replay_bytes", "eval_window", "eval_min",
                  "budget_steps_per_s", "boost_lr", "boost_steps", "ph_threshold"):
            if not getattr(self, k) > 0:
                raise ConfigError(f"[adapt] {k} = {getattr(self, k)!r}: must be positive")
        for k in ("anchor", "promote_margin", "rollback_margin", "boost_labels", "ph_delta"):
            if getattr(self, k) < 0:
                raise ConfigError(f"[adapt] {k} = {getattr(self, k)!r}: must be zero or positive")
        if not 0 <= self.recent_share <= 1:
            raise ConfigError(f"[adapt] recent_share = {self.recent_share!r}: must be in [0, 1]")
        if not 0 < self.budget_cpu_share <= 1:
            raise ConfigError(f"[adapt] budget_cpu_share = {self.budget_cpu_share!r}: must be in (0, 1]")
        if not 0 < self.adwin_delta < 1:
            raise ConfigError(f"[adapt] adwin_delta = {self.adwin_delta!r}: must be in (0, 1)")
        if self.eval_min > self.eval_window:
            raise ConfigError(f"[adapt] eval_min = {self.eval_min}: must not exceed eval_window = {self.eval_window}")

    @classmethod
    def from_dict(cls, d: dict, *, section: str = "adapt") -> "AdaptConfig":
        """Build from a config section; unknown keys are errors that list the known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"[{section}] unknown key {unknown[0]!r}; known keys: {', '.join(sorted(known))}")
        try:
            return cls(**d)
        except TypeError as e:
            raise ConfigError(f"[{section}] {e}") from None

    def to_dict(self) -> dict:
        return asdict(self)
