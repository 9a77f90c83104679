"""Which model folder a start serves: the configured one, or the release ``active.json`` names.

A switched release is served from ``<state_dir>/deploy/<release>/model`` after its folder
is checked against the digest the signed manifest carried (``check_pin``), the same check
``[model] sha256`` gets. A release that fails to start twice before it served once (its
``confirmed`` flag is set by the deploy part once the daemon runs) is rolled back to the
previous model by the next start, which then reports ``rolled_back``.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from edge.deploy.store import DeployStore
from edge.errors import EdgeError

log = logging.getLogger("edge.deploy")
MAX_ATTEMPTS = 2


def deploy_root(cfg) -> Path:
    from edge.state import node_state_dir

    return node_state_dir(cfg) / "deploy"


def active_model(cfg):
    """The ``ModelFolder`` of the switched release to serve, or None for the configured model."""
    if not cfg.deploy.enabled:
        return None
    store = DeployStore(deploy_root(cfg))
    a = store.active()
    if a is None:
        return None
    attempts = int(a.get("attempts", 0)) + (0 if a.get("confirmed") else 1)
    if not a.get("confirmed") and attempts > MAX_ATTEMPTS:
        return _fail(store, a, f"it did not start in {MAX_ATTEMPTS} tries")
    if not a.get("confirmed"):
        store.set_active({**a, "attempts": attempts})
    from edge.zoo import ModelFolder, check_pin

    try:
        model = ModelFolder(a["folder"])
        check_pin(model, a["digest"])
    except EdgeError as e:
        return _fail(store, a, str(e)[:200])
    log.info("serving release %s (%s %s) from %s", a.get("release"), model.manifest.name, a.get("version"), model.path)
    return model


def _fail(store: DeployStore, a: dict, why: str):
    """Back to the previous model; the deploy part reports ``rolled_back`` once it runs."""
    log.error("release %s cannot be served (%s): back to the previous model", a.get("release"), why)
    prev = a.get("previous") or {}
    store.set_active({**prev, "previous": None, "confirmed": True} if prev.get("folder") else None)
    s = store.agent_state()
    s["pending_report"] = {"release": a.get("release"), "state": "rolled_back", "reason": f"failed after the switch: {why}"[:200]}
    store.save_agent_state(s)
    return active_model_of(store)


def active_model_of(store: DeployStore):
    from edge.zoo import ModelFolder, check_pin

    a = store.active()
    if a is None:
        return None
    model = ModelFolder(a["folder"])
    check_pin(model, a["digest"])
    return model


def restart_process(why: str) -> None:
    """Run this very command again in this process (``exec``): the start that serves the switch."""
    log.warning("restarting to serve the new model: %s", why)
    argv = list(getattr(sys, "orig_argv", [])) or [sys.executable, *sys.argv]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *argv[1:]])
