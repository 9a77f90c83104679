"""The bodies of ``edge fleet-server release``, ``rollout`` and ``releases`` (parsers in
``edge.fleet.cli``). Each prints one JSON object a line, so a script can read it."""
from __future__ import annotations

import collections
import json

from edge.errors import EdgeError


def _model_name(cfg) -> str:
    from edge.zoo import resolve_model

    return resolve_model(cfg.server.model).manifest.name


def _summary(rec, reports) -> dict:
    from edge.fleet.release_codec import wave_of

    states = collections.Counter(p.state if p.state != "refused" else f"refused:{p.reason}" for p in reports)
    return {"release": rec.release, "version": rec.version, "digest": rec.digest, "size": rec.size, "seq": rec.seq,
            "state": rec.state, "wave": rec.wave, "waves": rec.plan["waves"],
            "chunks": len(rec.plan["chunks"]), "chunk_size": rec.plan["chunk_size"], "created": rec.created,
            "devices": dict(sorted(states.items())), "note": rec.note,
            "ever_switched": sorted(p.node for p in reports if "switched" in p.ever),
            "by_wave": dict(collections.Counter(str(wave_of(rec.release, p.node, rec.plan["waves"])) for p in reports))}


def _pick(store, cfg, model, release):
    rec = store.release(release) if release else store.current_release(cfg.server.fleet, model)
    if rec is None:
        raise EdgeError(f"no release {release}" if release else f"no release of {cfg.server.fleet}/{model} in the store")
    return rec


def run_release_command(args, cfg) -> int:
    from edge.fleet.release import load_release_key, make_release, operate, publish_manifest_once
    from edge.fleet.store import open_store

    model = _model_name(cfg)
    store = open_store(cfg.server.store)
    try:
        if args.fleet_cmd == "releases":
            if args.limit < 1:
                raise EdgeError(f"--limit {args.limit} is invalid: it must be at least 1")
            for rec in store.releases(cfg.server.fleet, model)[:args.limit]:
                reports = store.release_reports(rec.release)
                print(json.dumps({**_summary(rec, reports), "reports": [
                    {"node": p.node, "state": p.state, "reason": p.reason, "wave": p.wave, "progress": list(p.progress),
                     "evidence": p.evidence, "received": p.received} for p in reports]}))
            return 0
        if args.fleet_cmd == "rollout" and args.action == "status":
            rec = _pick(store, cfg, model, args.release)
            print(json.dumps(_summary(rec, store.release_reports(rec.release))))
            return 0
        key = load_release_key(cfg, name=args.key, keys_dir=args.keys_dir)
        if args.fleet_cmd == "release":
            rec = make_release(cfg, store, args.model_folder, key, waves=args.waves, min_labels=args.min_labels,
                               margin=args.margin, note=args.note)
        else:
            rec = operate(store, _pick(store, cfg, model, args.release).release, args.action, key)
        cur, published = publish_manifest_once(cfg, store, model)
        print(json.dumps({**_summary(rec, store.release_reports(rec.release)),
                          "published": bool(published and cur is not None and cur.seq >= rec.seq)}))
        return 0
    finally:
        store.close()
