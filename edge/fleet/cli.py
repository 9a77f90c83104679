"""The `edge keys` and `edge fleet-server` subcommands (registered by ``edge.cli``)."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass


def add_parsers(sub) -> None:
    k = sub.add_parser("keys", help="fleet signing keys: create, list, export (files 0600, folder 0700)",
                       description="Ed25519 keys for fleet sync: a device signs its deltas, the server its global heads.")
    ks = k.add_subparsers(dest="keys_cmd", required=True)
    role_help = ("device: signs its deltas and release reports; server: signs global heads and receipts; "
                 "release: signs model release manifests (kept apart from the server key)")
    dir_help = "keys folder"
    kc = ks.add_parser("create", help="create an Ed25519 key pair",
                       description="Create NAME.ROLE.key (private, 0600) and NAME.ROLE.pub; never overwrites one.")
    kc.add_argument("name", help="the key's name: a device's [node] name, or the server's")
    kc.add_argument("--role", choices=["device", "server", "release"], default="device", help=role_help + " (default device)")
    kc.add_argument("--dir", default="~/.config/edge-runtime/keys", help=dir_help)
    kl = ks.add_parser("list", help="list key pairs", description="Name, role, key id and public key file of each pair.")
    kl.add_argument("--dir", default="~/.config/edge-runtime/keys", help=dir_help)
    ke = ks.add_parser("export", help="print a public key, or write it as <to>/<name>.pub",
                       description="Print NAME's public key, or write it into a server's devices_dir as NAME.pub.")
    ke.add_argument("name", help="the key's name")
    ke.add_argument("--role", choices=["device", "server", "release"], default="device", help=role_help + " (default device)")
    ke.add_argument("--dir", default="~/.config/edge-runtime/keys", help=dir_help)
    ke.add_argument("--to", help="folder (a server's devices_dir, a device's trust folder)")
    k.set_defaults(func=_cmd_keys)

    f = sub.add_parser("fleet-server", help="the fleet sync server: run, versions, rollback VERSION, devices, "
                                            "release, rollout, releases")
    fs = f.add_subparsers(dest="fleet_cmd", required=True)
    for name, hlp in (("run", "run the server"), ("versions", "list global versions, newest first (paged)"),
                      ("rollback", "publish an earlier version's head as a new version"),
                      ("devices", "per device, by name (paged): last seen, accepted and rejected counts, reasons")):
        p = fs.add_parser(name, help=hlp, description=hlp[0].upper() + hlp[1:] + ".")
        p.add_argument("--config", "-c", help="fleet server TOML (example: deploy/config/fleet-server.toml)")
        if name == "rollback":
            p.add_argument("version", type=int, help="the stored version whose head becomes the newest version")
        if name == "run":
            p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info",
                           help="log level")
            p.add_argument("--check", action="store_true",
                           help="make every start-up check (config, TLS files, broker policy, model, key_file, "
                                "devices_dir, store opens), then exit with the code start-up would")
        if name in ("versions", "devices"):
            p.add_argument("--limit", type=int, default=100, help="at most this many lines (default 100)")
        if name == "versions":
            p.add_argument("--before", type=int, help="only versions older than this one (the next page)")
        if name == "devices":
            p.add_argument("--after", help="only devices named after this one (the next page)")
    _add_release_parsers(fs)
    f.set_defaults(func=_cmd_fleet)


def _add_release_parsers(fs) -> None:
    """``release``, ``rollout`` and ``releases`` (edge/fleet/RELEASE_FORMAT.md)."""
    key_help = ("sign with the release key NAME (<--keys-dir>/NAME.release.key; default: [release] key_file)")
    r = fs.add_parser("release", help="pack, sign, store and publish a model folder as a release",
                      description="Pack MODEL_FOLDER (its digest is what edge pin prints), sign the manifest with a "
                                  "release key, store it in the fleet store and publish the retained manifest; "
                                  "running servers roll it out in waves.")
    r.add_argument("model_folder", help="the model folder to release (the same model name as [server] model)")
    r.add_argument("--waves", help="cumulative percents of devices per wave, increasing, the last 100 "
                                   "(default: [release] waves, 5,25,100)")
    r.add_argument("--min-labels", type=int, help="labels a device's shadow test needs before it decides on evidence "
                                                  "(default: [release] min_labels, 50)")
    r.add_argument("--margin", type=float, help="the shadow test's 'no worse by' margin in loss units "
                                                "(default: [release] margin, 0)")
    r.add_argument("--note", default="", help="a note kept with the release (default none)")
    ro = fs.add_parser("rollout", help="a release's rollout: status, halt, resume, abort",
                       description="status: the plan, the open wave and each state's count; halt: admit no new "
                                   "device; resume: go on (forgives the refusals so far); abort: every device that "
                                   "switched returns to the previous model.")
    ro.add_argument("action", choices=["status", "halt", "resume", "abort"], help="what to do")
    ro.add_argument("--release", help="the release id (default: the one published now)")
    ls = fs.add_parser("releases", help="releases, newest first, with each device's last report",
                       description="Each release of this fleet's model, newest first, and each device's last report.")
    ls.add_argument("--limit", type=int, default=10, help="at most this many releases (default 10)")
    for p in (r, ro, ls):
        p.add_argument("--config", "-c", help="fleet server TOML (example: deploy/config/fleet-server.toml)")
    for p in (r, ro):
        p.add_argument("--key", help=key_help)
        p.add_argument("--keys-dir", default="~/.config/edge-runtime/keys", help="keys folder (default %(default)s)")


def _cmd_keys(args) -> int:
    from edge.fleet import keys

    if args.keys_cmd == "create":
        info = keys.create_key(args.dir, args.name, role=args.role)
        print(f"created {info.role} key {info.name} (id {info.key_id}): {info.private_path} (private), {info.public_path}")
    elif args.keys_cmd == "list":
        for info in keys.list_keys(args.dir):
            print(f"{info.name}\t{info.role}\t{info.key_id}\t{info.public_path}")
    else:
        out = keys.export_public(args.dir, args.name, role=args.role, to=args.to)
        print(out.decode().rstrip() if isinstance(out, bytes) else f"wrote {out}")
    return 0


@dataclass(frozen=True)
class Page:
    """One page of a listing: the items shown, and how many of the selection it leaves out."""

    items: list
    left_out: int


def page(items: list, *, limit: int, key, after=None, before=None) -> Page:
    """The first ``limit`` of ``items`` (already in listing order) past a cursor: ``key(item)``
    greater than ``after``, or less than ``before``; ``left_out`` counts the rest.

    >>> page([5, 4, 3, 2, 1], limit=2, key=int, before=5)
    Page(items=[4, 3], left_out=2)
    >>> page(["a", "b", "c"], limit=5, key=str, after="a")
    Page(items=['b', 'c'], left_out=0)
    """
    if limit < 1:
        from edge.errors import ConfigError

        raise ConfigError(f"--limit {limit} is invalid: it must be at least 1")
    if after is not None:
        items = [i for i in items if key(i) > after]
    if before is not None:
        items = [i for i in items if key(i) < before]
    return Page(items=items[:limit], left_out=max(0, len(items) - limit))


def _cmd_fleet(args) -> int:
    from edge.fleet.config import load_server_config
    from edge.fleet.store import open_store

    cfg = load_server_config(args.config)
    if args.fleet_cmd == "run":
        return _run(args, cfg)
    if args.fleet_cmd in ("release", "rollout", "releases"):
        from edge.fleet.release_cli import run_release_command

        return run_release_command(args, cfg)
    store = open_store(cfg.server.store)
    try:
        if args.fleet_cmd == "versions":
            # every version's row: the store reads newest first with a limit only
            pg = page(store.versions(limit=2**62), limit=args.limit, key=lambda v: v.version, before=args.before)
            for v in pg.items:
                print(f"{v.version}\tparent {v.parent}\t{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(v.created))}Z\t"
                      f"{v.n_deltas} deltas\t{v.note}")
            if pg.left_out:
                print(f"... {pg.left_out} older version{'s' if pg.left_out != 1 else ''}: --before {pg.items[-1].version}")
        elif args.fleet_cmd == "devices":
            pg = page(store.devices(), limit=args.limit, key=lambda d: d.node, after=args.after)
            for d in pg.items:
                print(json.dumps({"node": d.node, "last_seen": d.last_seen, "accepted": d.accepted, "rejected": d.rejected,
                                  "reasons": d.reasons}))
            if pg.left_out:
                print(f"... {pg.left_out} more device{'s' if pg.left_out != 1 else ''}: --after {pg.items[-1].node}")
        else:
            from edge.errors import EdgeError
            from edge.fleet.codec import unpack_message
            from edge.fleet.server import build_aggregator

            old = store.version(args.version)
            if old is None:
                raise EdgeError(f"no version {args.version} in {cfg.server.store}")
            agg = build_aggregator(cfg, store=store)
            arrays = unpack_message(old.message).tensors
            latest = store.latest()
            # the rolled-back head keeps the fleet's current reference, so the clip bound of the
            # next version is still the fleet's history, not its batch's (docs/TRUST.md)
            ref = agg.reference_metrics(latest.message)
            rec = store.add_version(lambda v: agg.pack_global(arrays, version=v, parent=latest.version, n=0, metrics=ref),
                                    f"rollback to version {args.version}")
            from edge.fleet.publish import publish_once

            # published now, under the fleet's publish lock (so no instance's older head
            # follows it); running servers publish it too, as the newest committed version
            head, published = publish_once(cfg, store)
            print(f"version {rec.version} = the head of version {args.version}; published "
                  f"{published and head is not None and head.version >= rec.version}")
    finally:
        store.close()
    return 0


def _run(args, cfg) -> int:
    """``fleet-server run [--check]``: every start-up check first (``edge.check``), then the server."""
    from edge.check import check_server_startup
    from edge.observe import setup_logging

    setup_logging(args.log_level)
    st = check_server_startup(cfg)
    if args.check:
        m, mq = st.model.manifest, cfg.mqtt
        print(f"{args.config or '(defaults)'}: OK — fleet server {cfg.server.name}, fleet {cfg.server.fleet}, "
              f"model {m.name}@{m.version}, {st.devices} device key(s), store at version {st.latest_version}, "
              f"broker {mq.host}:{mq.port} {'TLS' if mq.tls else 'plaintext'}, "
              f"release key {st.release_key or 'none (waves open and halts only by a command run with the key)'}")
        return 0
    from edge.fleet.server import FleetServer

    return FleetServer(cfg).run()
