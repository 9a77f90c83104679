"""The metric families of the pipeline's and the learner's parts, declared (beside
``edge.observe.SYNC_FAMILIES``): one family per quantity, what varies in labels.

Each entry is ``(family, kind, help, label, keys)`` as in ``SYNC_FAMILIES``: ``keys`` is a
stats key (a dict-valued key gives one series per entry, labelled ``label``) or
``{label value: key}``. Counters end in ``_total``. The README's table of families is
held to these tables and to a real ``/metrics`` by tests/test_metrics_families.py.
"""
from __future__ import annotations

from typing import Any, Callable

from edge.observe import Registry, sync_samples

#: Every lane (``edge.lanes.Lane``, ``CallLane``) of every thread, labelled ``thread`` and ``lane``.
LANE_FAMILIES = (
    ("edge_lane_items_total", "counter", "lane items, by outcome (offered, taken, dropped when full, shed as stale, "
     "refused as oversized; a call lane's coalesced and refused)", "outcome",
     {o: o for o in ("offered", "taken", "dropped", "stale", "oversized", "coalesced", "refused")}),
    ("edge_lane_bytes_total", "counter", "lane bytes lost, by outcome", "outcome",
     {"dropped": "dropped_bytes", "stale": "stale_bytes", "oversized": "oversized_bytes"}),
    ("edge_lane_messages_total", "counter", "MQTT messages through a lane, by outcome", "outcome",
     {o: f"{o}_messages" for o in ("offered", "dropped", "stale", "oversized")}),
    ("edge_lane_samples_total", "counter", "sensor samples lost in a lane, by outcome", "outcome",
     {o: f"{o}_samples" for o in ("dropped", "stale", "oversized")}),
    ("edge_lane_depth", "gauge", "items waiting in a lane", None, "depth"),
    ("edge_lane_depth_bytes", "gauge", "bytes waiting in a lane", None, "depth_bytes"),
    ("edge_lane_max_bytes", "gauge", "a lane's byte bound", None, "max_bytes"),
)

_HEADS = ("champion", "challenger", "global", "reference")

#: The learner (``AdaptWorker.metrics()``), read once per scrape.
ADAPT_FAMILIES = (
    ("edge_adapt_learned_total", "counter", "learner: labelled windows the head learned from", None, "worker_learned"),
    ("edge_adapt_self_supervised_total", "counter", "learner: forecast windows trained on their own future", None,
     "worker_self_supervised"),
    ("edge_adapt_checkpoints_total", "counter", "learner: checkpoints, by outcome", "outcome",
     {"written": "worker_checkpoints", "failed": "worker_checkpoint_errors", "unchanged": "store_unchanged"}),
    ("edge_adapt_checkpoint_mismatches_total", "counter", "learner: checkpoints not applied (another model or layout)",
     None, "worker_checkpoint_mismatches"),
    ("edge_adapt_checkpoint_store_total", "counter", "learner: checkpoint store events, by kind", "event",
     {"pruned_for_room": "store_pruned_for_room", "retried": "store_retried", "set_aside": "store_set_aside"}),
    ("edge_adapt_shutdown_items_total", "counter", "learner: items queued at stop, by outcome", "outcome",
     {"learned": "worker_shutdown_drained", "dropped": "worker_shutdown_dropped"}),
    ("edge_adapt_learner_labels_total", "counter", "learner: labels given to the learner", None, "learner_labels_total"),
    ("edge_adapt_learner_labels_rejected_total", "counter", "learner: labels the learner refused, by reason", "reason",
     "learner_labels_rejected"),
    ("edge_adapt_train_steps_total", "counter", "learner: training steps, by outcome", "outcome",
     {"taken": "learner_train_steps_total", "skipped": "learner_train_steps_skipped_total"}),
    ("edge_adapt_head_events_total", "counter", "learner: head changes and detections, by kind", "kind",
     {"promotion": "learner_promotions_total", "promotion_held": "learner_promotions_held_total",
      "refresh": "learner_refreshes_total", "rollback": "learner_rollbacks_total", "drift": "learner_drifts_total",
      "label_anomaly": "learner_label_anomalies_total"}),
    ("edge_adapt_guard_recent_share", "gauge", "learner: share of recent labels in the guard's window", None,
     "learner_guard_recent_share"),
    ("edge_adapt_replay_samples", "gauge", "learner: samples in the replay buffer", None, "learner_replay_samples"),
    ("edge_adapt_replay_bytes", "gauge", "learner: bytes of the replay buffer", None, "learner_replay_bytes"),
    ("edge_adapt_boost_labels_left", "gauge", "learner: labels left at the boosted learning rate", None,
     "learner_boost_labels_left"),
    ("edge_adapt_champion_is_global", "gauge", "learner: 1 while the serving head is the shipped or fleet head", None,
     "learner_champion_is_global"),
    *((f"edge_adapt_prequential_{q}", "gauge", f"learner: prequential {q.replace('_', ' ')}, by head", "head",
       {h: f"learner_{h}_{q}" for h in _HEADS}) for q in ("accuracy", "log_loss", "mse", "mae", "faded_loss")),
    ("edge_adapt_labels_matched_total", "counter", "label matcher: labels matched to a cached window", None,
     "matcher_labels_matched_total"),
    ("edge_adapt_labels_rejected_total", "counter", "label matcher: labels rejected, by reason", "reason",
     "matcher_labels_rejected"),
    ("edge_adapt_labels_pending", "gauge", "label matcher: labels waiting for their window", None,
     "matcher_labels_pending"),
    ("edge_adapt_windows_cached", "gauge", "label matcher: windows cached for late labels", None,
     "matcher_windows_cached"),
    ("edge_adapt_label_cache_bytes", "gauge", "label matcher: bytes of the window cache", None, "matcher_cache_bytes"),
    ("edge_adapt_windows_evicted_total", "counter", "label matcher: windows evicted by the cache's byte bound", None,
     "matcher_windows_evicted_total"),
    ("edge_adapt_windows_superseded_total", "counter",
     "label matcher: cached windows dropped because their stream's time went back before them", None,
     "matcher_windows_superseded_total"),
    ("edge_adapt_label_cache_restore_dropped_total", "counter",
     "label matcher: streams or pending labels of a restored cache that did not fit, by kind", "kind",
     "matcher_restore_dropped"),
    ("edge_adapt_forecast_pending", "gauge", "forecast: windows waiting for their future samples", None,
     "forecast_pending"),
    ("edge_adapt_forecast_dropped_total", "counter", "forecast: windows whose future never came", None,
     "forecast_dropped"),
)

#: The learner's lanes inside ``AdaptWorker.metrics()``: ``lane_<name>_<stat>``.
ADAPT_LANES = ("learner", "labels", "fleet")


def adapt_lanes(m: dict) -> dict[tuple[str, str], dict]:
    """The learner's lane stats, by (thread, lane), out of one ``AdaptWorker.metrics()`` snapshot.

    >>> adapt_lanes({"lane_labels_dropped": 2, "lane_labels_depth_bytes": 9, "worker_learned": 1})
    {('learner', 'labels'): {'dropped': 2, 'depth_bytes': 9}}
    """
    out: dict[tuple[str, str], dict] = {}
    for name in ADAPT_LANES:
        prefix = f"lane_{name}_"
        stats = {k[len(prefix):]: v for k, v in m.items() if k.startswith(prefix)}
        if stats:
            out[("learner", name)] = stats
    return out


def lane_samples(spec, lanes: dict[tuple[str, str], dict]) -> list:
    """The series of one ``LANE_FAMILIES`` entry over every lane (``{(thread, lane): stats}``).

    >>> lane_samples(LANE_FAMILIES[1], {("pipeline", "sensor"): {"dropped_bytes": 5, "stale_bytes": 0}})
    [({'outcome': 'dropped', 'thread': 'pipeline', 'lane': 'sensor'}, 5.0), ({'outcome': 'stale', 'thread': 'pipeline', 'lane': 'sensor'}, 0.0)]
    """
    return [({**labels, "thread": thread, "lane": lane}, v)
            for (thread, lane), stats in lanes.items() for labels, v in sync_samples(spec, stats, absent=None)]


def add_lane_families(reg: Registry, lanes: list[tuple[str, Callable[[Any], dict]]]) -> None:
    """Every ``LANE_FAMILIES`` family over the lanes of every part: ``lanes`` holds one
    ``(source, pick)`` per part with lanes (``edge.parts.Part.lanes``), ``pick(snapshot of
    source)`` giving ``{(thread, lane): stats}``; each source is read once per scrape."""
    sources, picks = tuple(src for src, _ in lanes), [pick for _, pick in lanes]

    def every(*snaps) -> dict:
        out: dict = {}
        for pick, snap in zip(picks, snaps):
            out.update(pick(snap))
        return out

    for spec in LANE_FAMILIES:
        reg.add(spec[0], spec[1], spec[2], lambda *snaps, spec=spec: lane_samples(spec, every(*snaps)), source=sources)


def add_adapt_families(reg: Registry, source: str, pick=lambda snap: snap) -> None:
    """Every ``ADAPT_FAMILIES`` family, cut from ``pick(snapshot)`` of ``source`` (an
    ``AdaptWorker.metrics()`` dict); a gauge the learner does not have (a regression head's
    accuracy) has no series."""
    for spec in ADAPT_FAMILIES:
        absent = 0.0 if spec[1] == "counter" else None
        reg.add(spec[0], spec[1], spec[2], lambda snap, spec=spec, a=absent: sync_samples(spec, pick(snap), absent=a),
                source=source)
