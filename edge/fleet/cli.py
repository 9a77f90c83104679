"""The `edge keys` and `edge fleet-server` subcommands (registered by ``edge.cli``)."""
from __future__ import annotations

import json
import time


def add_parsers(sub) -> None:
    k = sub.add_parser("keys", help="fleet signing keys: create, list, export (files 0600, folder 0700)")
    ks = k.add_subparsers(dest="keys_cmd", required=True)
    kc = ks.add_parser("create", help="create an Ed25519 key pair")
    kc.add_argument("name")
    kc.add_argument("--role", choices=["device", "server"], default="device")
    kc.add_argument("--dir", default="~/.config/edge-runtime/keys")
    kl = ks.add_parser("list", help="list key pairs")
    kl.add_argument("--dir", default="~/.config/edge-runtime/keys")
    ke = ks.add_parser("export", help="print a public key, or write it as <to>/<name>.pub")
    ke.add_argument("name")
    ke.add_argument("--role", choices=["device", "server"], default="device")
    ke.add_argument("--dir", default="~/.config/edge-runtime/keys")
    ke.add_argument("--to", help="folder (a server's devices_dir, a device's trust folder)")
    k.set_defaults(func=_cmd_keys)

    f = sub.add_parser("fleet-server", help="the fleet sync server: run, versions, rollback VERSION, devices")
    fs = f.add_subparsers(dest="fleet_cmd", required=True)
    for name, hlp in (("run", "run the server"), ("versions", "list global versions"),
                      ("rollback", "publish an earlier version's head as a new version"),
                      ("devices", "per device: last seen, accepted and rejected counts, reasons")):
        p = fs.add_parser(name, help=hlp)
        p.add_argument("--config", "-c", help="fleet server TOML")
        if name == "rollback":
            p.add_argument("version", type=int)
        if name == "run":
            p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")
    f.set_defaults(func=_cmd_fleet)


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


def _cmd_fleet(args) -> int:
    from edge.fleet.config import load_server_config
    from edge.fleet.store import open_store

    cfg = load_server_config(args.config)
    if args.fleet_cmd == "run":
        from edge.fleet.server import FleetServer
        from edge.observe import setup_logging

        setup_logging(args.log_level)
        return FleetServer(cfg).run()
    store = open_store(cfg.server.store)
    try:
        if args.fleet_cmd == "versions":
            for v in store.versions():
                print(f"{v.version}\tparent {v.parent}\t{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(v.created))}Z\t"
                      f"{v.n_deltas} deltas\t{v.note}")
        elif args.fleet_cmd == "devices":
            for d in store.devices():
                print(json.dumps({"node": d.node, "last_seen": d.last_seen, "accepted": d.accepted, "rejected": d.rejected,
                                  "reasons": d.reasons}))
        else:
            from edge.errors import EdgeError
            from edge.fleet.codec import unpack_message
            from edge.fleet.server import build_aggregator

            old = store.version(args.version)
            if old is None:
                raise EdgeError(f"no version {args.version} in {cfg.server.store}")
            agg = build_aggregator(cfg, store=store)
            arrays = unpack_message(old.message).tensors
            latest = store.latest().version
            rec = store.add_version(lambda v: agg.pack_global(arrays, version=v, parent=latest, n=0),
                                    f"rollback to version {args.version}")
            print(f"version {rec.version} = the head of version {args.version}; a running server publishes it")
    finally:
        store.close()
    return 0
