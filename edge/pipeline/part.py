"""The pipeline as a part of the daemon (``edge.parts.Part``): its threads, stop phases,
status fields and metric families, next to the pipeline itself.

Every read is a snapshot under its owner's lock (STYLE 19): ``Pipeline.snapshot`` (counters,
bad input, lanes), ``WindowerBank.snapshot`` (streams), ``LatencyHistogram.snapshot``; a
scrape reads the pipeline's and the bank's once each (sources ``pipeline`` and ``streams``).
"""
from __future__ import annotations

from typing import Any

from edge.observe import Registry, hist_series
from edge.parts import Part
from edge.pipeline.loop import Pipeline

#: ``(family, help, counter key)`` of the pipeline's own counters (``Pipeline.snapshot()["counters"]``)
_COUNTERS = (
    ("edge_messages_total", "MQTT messages the pipeline took in (served or bad input)", ("messages",)),
    ("edge_windows_served_total", "windows served", ("windows_served",)),
    ("edge_predictions_published_total", "predictions handed to the broker client", ("published",)),
    ("edge_predictions_failed_total", "predictions the broker client refused or failed on",
     ("publish_failed", "publish_errors")),
    ("edge_shutdown_dropped_total", "queued messages and items left unprocessed at stop", ("shutdown_dropped",)),
    ("edge_shutdown_dropped_samples_total", "samples in what was left unprocessed at stop",
     ("shutdown_dropped_samples",)),
)

#: ``(family, kind, help, windower counter)`` per stream (``Windower.counters``)
_PER_STREAM = (
    ("edge_stream_samples_total", "samples per stream", "samples"),
    ("edge_stream_gaps_total", "gaps that restarted a window, per stream", "gaps"),
    ("edge_stream_out_of_order_total", "samples dropped as out of order, per stream", "out_of_order"),
    ("edge_stream_filled_total", "samples filled by interpolation, per stream", "filled"),
)


def flag_fields(pipeline: Pipeline, key, old: str | None, new: str | None) -> dict[str, Any]:
    """The fields of a ``stream_flag`` event: the flag and what the stream's windower measured."""
    w = pipeline.bank.streams[key].windower
    return {"device": key.device, "stream": key.stream, "flag": new, "previous": old,
            "rate_hz": round(w.estimated_rate, 2), "expected_hz": w.sample_rate,
            "filled": w.counters["filled"], "samples": w.counters["samples"]}


def _pipeline_lanes(snap: dict) -> dict:
    return {("pipeline", k): v for k, v in snap["lanes"].items()}


class PipelinePart(Part):
    """The ``pipeline`` thread: drained at stop once the sources have stopped, its leftovers counted."""

    name = "pipeline"
    lanes = ("pipeline", _pipeline_lanes)

    def __init__(self, pipeline: Pipeline):
        self.pipeline = pipeline

    def start(self) -> None:
        self.pipeline.start()  # spawned through the supervisor: no thread to adopt

    def drain(self) -> None:
        self.pipeline.stop()

    def close(self) -> None:
        self.pipeline.count_left()  # clean sessions: labels that arrived on the link after the pipeline's drain

    def status(self) -> dict[str, Any]:
        p = self.pipeline
        snap = p.snapshot()
        return {"pipeline": snap["counters"], "lanes": snap["lanes"], "bad_input": snap["bad"],
                "streams": {str(k): s.stats() for k, s in p.bank.snapshot()}, "clock": p.clock.snapshot()}

    def families(self, reg: Registry) -> None:
        p = self.pipeline
        reg.source("pipeline", p.snapshot)
        reg.source("streams", p.bank.snapshot)
        for name, help_text, keys in _COUNTERS:
            reg.add(name, "counter", help_text, lambda snap, keys=keys: sum(snap["counters"][k] for k in keys),
                    source="pipeline")
        reg.add("edge_bad_input_total", "counter", "inputs skipped, by kind",
                lambda snap: [({"kind": k}, v) for k, v in snap["bad"].items()], source="pipeline")
        for name, help_text, counter in _PER_STREAM:
            reg.add(name, "counter", help_text,
                    lambda streams, c=counter: [({"stream": str(k)}, s.windower.counters[c]) for k, s in streams],
                    source="streams")
        reg.add("edge_stream_rate_hz", "gauge", "measured sample rate, per stream",
                lambda streams: [({"stream": str(k)}, s.windower.estimated_rate) for k, s in streams], source="streams")
        reg.add("edge_stream_flagged", "gauge", "1 while a stream is off its rate or fills too much, by reason",
                lambda streams: [({"stream": str(k), "reason": s.flag}, 1.0) for k, s in streams if s.flag],
                source="streams")
        reg.add_histogram("edge_pipeline_latency_seconds", "receive-to-publish latency of each window",
                          lambda: [hist_series({}, p.latency.snapshot())])
        reg.add("edge_clock_skew_seconds", "gauge", "how far this node's wall clock is behind its timed sources' clocks",
                lambda: p.clock.skew)
        reg.add("edge_clock_steps_total", "counter", "steps of this node's wall clock seen (monotonic clock as reference)",
                lambda: p.clock.steps)
