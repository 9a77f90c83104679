"""The `edge` command: run, demo, compile, bench, status; keys and fleet-server (edge.fleet.cli).

Every ``EdgeError`` becomes one line on stderr and its documented exit code:
1 generic, 2 config, 3 model, 4 backend unavailable, 5 parity/artifact, 6 decode,
7 state, 8 broker, 9 fleet key file. Anything else is a bug and keeps its traceback.
Every code but ``TRANSIENT_EXIT_CODES`` is in the systemd units' ``RestartPreventExitStatus=``
(tests/test_deploy.py derives the set from the code).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from edge.errors import EdgeError

#: exit codes a restart may cure: 1 (a thread died, or an error with no kind of its own, e.g.
#: a PostgreSQL store not up yet) and 8 (the broker cannot be reached). Every other code is
#: a fault of the config, the model, the machine or a key that stays until a person fixes it.
TRANSIENT_EXIT_CODES = frozenset({1, 8})


def _cmd_run(args) -> int:
    from edge.check import check_model, check_startup
    from edge.config import load_config
    from edge.observe import setup_logging

    setup_logging(args.log_level or "info")  # before the config: loading it may warn (a readable password_file)
    cfg = load_config(args.config)
    # the one function of every start-up check, for --check and the daemon alike (Daemon.start
    # makes it again, so a daemon built without this command is held to the same checks)
    startup = check_startup(cfg)
    if args.check:
        mc = check_model(startup.model)  # only after the pin: the verified bytes run
        print(f"{args.config or '(defaults)'}: OK — node {cfg.node.name}, model {mc.name}@{mc.version} "
              f"(one window {mc.window_shape} -> {mc.output_shape}), {len(cfg.sources)} source(s), "
              f"broker {cfg.mqtt.host}:{cfg.mqtt.port} {'TLS' if cfg.mqtt.tls else 'plaintext'}"
              f"{', model pinned' if cfg.model.sha256 else ''}")
        return 0
    setup_logging(args.log_level or cfg.node.log_level)
    from edge.daemon import Daemon

    return Daemon(cfg).run()


def _cmd_demo(args) -> int:
    if args.fleet:  # fleet sync (issue 9)
        from edge.demo.fleet import run_fleet_demo

        return run_fleet_demo(seconds=args.seconds, broker=args.broker, out=Path(args.out), devices=args.devices,
                              live=not args.no_live)
    from edge.demo import run_demo

    return run_demo(seconds=args.seconds, broker=args.broker, out=Path(args.out), live=not args.no_live,
                    devices=args.devices, drift_at=args.drift_at, serial=not args.no_serial)


def _cmd_compile(args) -> int:
    from edge.observe import setup_logging
    from edge.serve.compile import compile_model
    from edge.zoo import resolve_model

    setup_logging("warning" if args.quiet else "info")  # --quiet: the summary line and warnings only
    res = compile_model(resolve_model(args.model), backend=args.backend,
                        precision=None if args.precision == "auto" else args.precision,
                        calibration=args.calibration, cache_dir=args.cache_dir, progress=not args.quiet,
                        threads=args.threads, force=args.force)
    print(res.summary() if hasattr(res, "summary") else res)
    return 0


BENCHES = {"pipeline": "edge.bench.pipeline", "serve": "edge.bench.serve", "adapt": "edge.bench.adapt",
           "serial": "edge.bench.serial", "mqtt": "edge.bench.mqtt", "learning": "edge.bench.learning",
           "device": "edge.bench.device", "fleet": "edge.bench.fleet", "units": "edge.bench.units"}


def _bench(what: str, argv: list[str]) -> int:
    import importlib

    modname = BENCHES[what]
    return int(importlib.import_module(modname).main(argv) or 0)


def _cmd_status(args) -> int:
    from edge.config import load_config
    from edge.control import read_status
    from edge.daemon import state_dir
    from edge.status_view import render_status

    cfg = load_config(args.config)
    d = state_dir(cfg)
    out: dict = {}
    try:  # live, from the running daemon's socket
        out["daemon"], source = read_status(d / "edge.sock"), "live"
    except (OSError, ValueError):
        p = d / "status.json"
        if p.exists():  # the file the daemon rewrites every 5 s: possibly stale, and said so
            out["daemon"], source = json.loads(p.read_text()), f"from {p}: no daemon answers on {d / 'edge.sock'}"
        else:
            out["daemon"], source = None, f"no daemon answers on {d / 'edge.sock'} and there is no {p}"
    from edge.serve import serve_status

    out["serving"] = serve_status(cfg.model.cache_dir or None)
    if args.json:
        print(json.dumps({**out, "source": source}, indent=2, default=str))
    elif out["daemon"] is None:
        print(f"not running ({source})")
    else:
        print(render_status(out["daemon"], source=source))
    return 0


def _cmd_pin(args) -> int:
    from edge.zoo import folder_digest, resolve_model

    m = resolve_model(args.model)
    print(f"sha256 = \"{folder_digest(m.path)}\"    # [model] pin for {m.path}")
    return 0


def _cmd_label_key(args) -> int:
    from edge.ingest.labelauth import create_label_key

    p = create_label_key(args.dir, args.name)
    print(f"wrote {p} (0600): give it to labeller {args.name!r}; the daemon reads it from [labels] keys_dir = \"{args.dir}\"")
    return 0


def _version() -> str:
    """The installed distribution's version, else the source tree's (a checkout on PYTHONPATH)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("edge-runtime")
    except PackageNotFoundError:
        from edge import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="edge", description="Edge runtime: sensors in, compiled model served, head learned online.")
    ap.add_argument("--version", action="version", version=f"edge-runtime {_version()}")
    sub = ap.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="run the daemon")
    r.add_argument("--config", "-c", help="TOML config (default: built-in defaults)")
    r.add_argument("--check", action="store_true", help="make every start-up check (config, TLS files, broker policy, state folder, model pin, label and fleet keys), "
                        "then run one window through the model, and exit with the code start-up would")
    r.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    r.set_defaults(func=_cmd_run)

    d = sub.add_parser("demo", help="start a broker, simulated devices and the daemon; show a live view")
    d.add_argument("--seconds", type=float, default=0, help="end after N seconds (default: until Ctrl-C)")
    d.add_argument("--broker", default="", help="HOST:PORT of an existing broker (default: start one)")
    d.add_argument("--out", default="demo-report", help="folder for report.json and report.png")
    d.add_argument("--devices", type=int, default=3, help="simulated MQTT devices")
    d.add_argument("--drift-at", type=float, default=None, help="seconds until drift hits one device (default: a third of the run)")
    d.add_argument("--no-live", action="store_true", help="no live terminal view (log lines instead)")
    d.add_argument("--no-serial", action="store_true", help="no simulated serial device")
    d.add_argument("--fleet", action="store_true", help="fleet sync: a server, devices with their own shifts, one joining late")
    d.set_defaults(func=_cmd_demo)

    c = sub.add_parser("compile", help="compile a model's backbone for a backend into the cache")
    c.add_argument("model", help="model folder or shipped model name")
    c.add_argument("--backend", default="auto", choices=["auto", "onnxruntime", "tensorrt", "torch"])
    c.add_argument("--precision", default="auto", choices=["auto", "int8", "fp16", "fp32"])
    c.add_argument("--calibration", help=".npy/.npz file of windows [N, C, L] for int8 calibration")
    c.add_argument("--cache-dir", help="artifact cache (default ~/.cache/edge-runtime)")
    c.add_argument("--threads", type=int, default=1, help="inference threads used for the parity check")
    c.add_argument("--force", action="store_true", help="rebuild even if cached or refused before")
    c.add_argument("--quiet", action="store_true", help="print only the summary line (and warnings)")
    c.set_defaults(func=_cmd_compile)

    b = sub.add_parser("bench", help="benchmarks: pipeline, serve, adapt, serial, mqtt, learning, device, fleet, units (see BENCHMARKS.md)")
    b.add_argument("what", choices=list(BENCHES))
    b.set_defaults(func=None)

    s = sub.add_parser("status", help="backend availability and the running daemon's status")
    s.add_argument("--config", "-c")
    s.add_argument("--json", action="store_true", help="machine-readable JSON instead of the table")
    s.set_defaults(func=_cmd_status)

    pn = sub.add_parser("pin", help="print a model folder's content digest for [model] sha256")
    pn.add_argument("model", help="model folder or shipped model name")
    pn.set_defaults(func=_cmd_pin)

    lk = sub.add_parser("label-key", help="create a labeller's HMAC key for signed labels ([labels] keys_dir)")
    lk.add_argument("name", help="the labeller's name (it signs as this)")
    lk.add_argument("--dir", default="/etc/edge-runtime/labellers", help="the keys folder")
    lk.set_defaults(func=_cmd_label_key)

    # fleet sync (issue 9): `edge keys ...`, `edge fleet-server ...`
    from edge.fleet.cli import add_parsers as _fleet_parsers

    _fleet_parsers(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = build_parser()
    if len(argv) >= 2 and argv[0] == "bench" and argv[1] in BENCHES:
        # the benchmark parses its own options (and its own --help), not the parent's
        args, rest = argparse.Namespace(cmd="bench", what=argv[1]), argv[2:]
    else:
        args, rest = ap.parse_known_args(argv)
    try:
        if args.cmd == "bench":
            return _bench(args.what, rest)
        if rest:
            ap.error(f"unrecognized arguments: {' '.join(rest)}")
        return args.func(args)
    except EdgeError as e:
        # One line, whatever the message holds (torch's load errors span several): journald
        # and the unit's status show the first line only.
        print("edge: error: " + " ".join(part.strip() for part in str(e).splitlines() if part.strip()), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    logging.captureWarnings(True)
    sys.exit(main())
