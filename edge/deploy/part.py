"""The deploy part as the daemon sees it: built from the config, with its own MQTT connection.

Why its own connection (client id ``<client_id>-deploy``) and not the fleet sync one: fleet
sync runs only with ``[adapt]`` on, and its link's subscriptions are fixed when it is
built; a release must reach a device that does not learn too. It comes from the one
factory (``edge.ingest.mqtt.MqttLink`` -> ``edge.mqttconn``), so TLS, credentials and the
plaintext policy are the same as every other connection's.
"""
from __future__ import annotations

import logging
from pathlib import Path

from edge.deploy.active import deploy_root, restart_process
from edge.deploy.agent import DeployAgent
from edge.deploy.tap import ShadowTap

log = logging.getLogger("edge.deploy")


def release_keys(cfg) -> list:
    """The trusted release public keys: every ``*.pub`` in ``[deploy] release_keys_dir``
    (default: ``<folder of [fleet] key_file>/releases``)."""
    from edge.errors import ConfigError
    from edge.fleet.keys import load_public

    d = Path(cfg.deploy.release_keys_dir or Path(cfg.fleet.key_file).expanduser().parent / "releases").expanduser()
    keys = [load_public(p) for p in sorted(d.glob("*.pub"))] if d.is_dir() else []
    if not keys:
        raise ConfigError(f"[deploy] enabled but no release public key (*.pub) in {d}: add one "
                          "(edge keys export NAME --role release --to DIR) or set [deploy] release_keys_dir")
    return keys


class DeployPart:
    """``tap`` (for ``build_pipeline``), then ``attach(served)``, ``start``, ``stop``, ``status``, ``metrics``."""

    def __init__(self, *, cfg, model, features, on_window, on_label, request_restart=restart_process):
        self.cfg, self.model = cfg, model
        self.tap = ShadowTap(features, on_window, on_label)
        self.request_restart = request_restart
        self.keys = release_keys(cfg)
        self.agent: DeployAgent | None = None
        self.link = None

    def attach(self, served) -> None:
        """Build the agent and its link once the serving backend (``served``) is known."""
        from edge.fleet.keys import load_private
        from edge.ingest.mqtt import MqttLink

        cfg = self.cfg
        self.agent = DeployAgent(cfg=cfg, root=deploy_root(cfg), node=cfg.node.name, fleet=cfg.fleet.fleet,
                                 model_name=self.model.manifest.name, current=self.model, served=served,
                                 device_key=load_private(cfg.fleet.key_file), release_keys=self.keys,
                                 publish=self._publish, request_restart=self.request_restart, tap=self.tap)
        self.link = MqttLink(cfg.mqtt, client_id=f"{cfg.mqtt.client_id or 'edge-' + cfg.node.name}-deploy",
                             status_topic=f"{cfg.topic_base}/deploy/status", subscriptions=self.agent.subscriptions,
                             on_message=self.agent.on_message)

    def _publish(self, topic: str, payload: bytes):
        return self.link.publish(topic, payload, qos=1)

    # ---- the daemon's part hooks (edge.parts.Part) ------------------------------------
    name = "deploy"
    lanes = None

    def start(self) -> None:
        self.agent.start()
        self.link.start()

    def threads(self) -> dict:
        return {"deploy": self.agent.thread, "deploy-link": getattr(self.link.client, "_thread", None)}

    def stop_input(self) -> None:
        if self.agent is not None:
            self.agent.stop()

    def drain(self) -> None:
        """Nothing to drain: a download resumes from its held chunks, a shadow test starts over."""

    def close(self) -> None:
        if self.link is not None:
            self.link.stop()

    def stop(self) -> None:
        self.stop_input()
        self.close()

    def status(self) -> dict:
        return {"deploy": self.agent.status() if self.agent is not None else {}}

    def metrics(self) -> dict:
        return self.agent.metrics() if self.agent is not None else {}

    def families(self, reg) -> None:
        """One family per quantity, outcomes and reasons as labels."""
        reg.source("deploy", self.metrics)
        by = lambda *names: (lambda s: [({"outcome": n}, s.get(f"deploy_{k}", 0)) for n, k in names])  # noqa: E731
        reg.add("edge_deploy_manifests_total", "counter", "release manifests, by outcome",
                by(("accepted", "manifests"), ("refused", "manifests_refused"), ("replayed", "manifests_replayed")),
                source="deploy")
        reg.add("edge_deploy_chunks_total", "counter", "release chunks, by outcome",
                by(("requested", "chunks_requested"), ("received", "chunks_received"),
                   ("duplicate", "chunks_duplicate"), ("bad", "chunks_bad")), source="deploy")
        reg.add("edge_deploy_refused_total", "counter", "releases refused, by reason",
                lambda s: [({"reason": r}, n) for r, n in sorted(s.get("deploy_refused", {}).items())], source="deploy")
        reg.add("edge_deploy_steps_total", "counter", "reports sent, switches and rollbacks",
                by(("report", "reports"), ("switch", "switches"), ("rollback", "rollbacks"), ("error", "errors")),
                source="deploy")
        reg.add("edge_deploy_shadow_windows_total", "counter", "live windows offered to the shadow test, by outcome",
                by(("offered", "shadow_windows_offered"), ("taken", "shadow_windows_taken"),
                   ("dropped", "shadow_windows_dropped")), source="deploy")
        reg.add("edge_deploy_shadow_labels_total", "counter", "labels for the shadow test, by outcome",
                by(("matched", "shadow_labels_matched"), ("unmatched", "shadow_labels_unmatched")), source="deploy")
