"""Fleet sync (``DeviceSync``) as a part of the daemon (``edge.parts.Part``): its own
thread and MQTT connection; ``SyncClient.metrics()`` read once per scrape and per status."""
from __future__ import annotations

from typing import Any

from edge.observe import Registry, add_sync_families
from edge.parts import Part


class SyncPart(Part):
    """Added after the learner, so stopped before it drains: nothing sync hands the learner (its
    fleet lane) comes after the learner's final checkpoint."""

    name = "fleet"

    def __init__(self, sync):
        self.sync = sync

    def start(self) -> None:
        self.sync.start()

    def threads(self) -> dict:
        return {"sync": self.sync.client.thread, "fleet-link": getattr(self.sync.link.client, "_thread", None)}

    def drain(self) -> None:
        self.sync.stop()

    def status(self) -> dict[str, Any]:
        return {"fleet": self.sync.metrics()}

    def families(self, reg: Registry) -> None:
        add_sync_families(reg, self.sync.metrics)
