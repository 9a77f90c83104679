"""The `edge` command: run, demo, compile, bench, status, pin, label; keys and fleet-server (edge.fleet.cli).

Every ``EdgeError`` becomes one line on stderr and its documented exit code (``EXIT_CODES``,
the one list: the top-level ``--help`` and the README show it). Anything else is a bug and
keeps its traceback.
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

#: every exit code of every command, in one place (tests hold each EdgeError's code to it)
EXIT_CODES = {0: "ok", 1: "error (a thread died, no daemon answers `edge status`, no command given)",
              2: "bad config or command line", 3: "bad model folder, or one that does not match its pin",
              4: "backend unavailable", 5: "artifact failed parity or is corrupt", 6: "undecodable input",
              7: "checkpoint or state error (the state folder, the fleet store)", 8: "broker unreachable",
              9: "fleet key file missing or unreadable", 130: "interrupted (Ctrl-C)"}

#: where `edge run` and `edge status` read the config when no --config is given: $EDGE_CONFIG,
#: else this file when it exists (what deploy/install.sh writes), else the built-in defaults
DEFAULT_CONFIG = "/etc/edge-runtime/edge.toml"
CONFIG_HELP = (f"TOML config (default: $EDGE_CONFIG, else {DEFAULT_CONFIG} when it exists, "
               "else the built-in defaults)")


def config_path(given: str | None) -> str | None:
    """The config file `edge run` and `edge status` both use: one rule, so that status finds
    the daemon that run started."""
    import os

    if given:
        return given
    if os.environ.get("EDGE_CONFIG"):
        return os.environ["EDGE_CONFIG"]
    return DEFAULT_CONFIG if Path(DEFAULT_CONFIG).is_file() else None


def _cmd_run(args) -> int:
    from edge.check import check_model, check_startup
    from edge.config import load_config
    from edge.observe import setup_logging

    setup_logging(args.log_level or "info")  # before the config: loading it may warn (a readable password_file)
    args.config = config_path(args.config)
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

        return run_fleet_demo(seconds=args.seconds or 90.0, broker=args.broker, out=Path(args.out), devices=args.devices,
                              live=not args.no_live)
    from edge.demo import run_demo

    return run_demo(seconds=60.0 if args.seconds is None else args.seconds, broker=args.broker, out=Path(args.out),
                    live=not args.no_live, devices=args.devices, drift_at=args.drift_at, serial=not args.no_serial,
                    seed=args.seed)


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
           "device": "edge.bench.device", "fleet": "edge.bench.fleet", "units": "edge.bench.units",
           "deploy": "edge.bench.deploy"}
BENCH_HELP = {"pipeline": "MQTT in, windows, model, predictions out, against a naive baseline",
              "serve": "every candidate artifact of a model folder (MODEL), same inputs, one core",
              "adapt": "online adaptation under simulated drift, against three baselines",
              "serial": "decode throughput of the serial link (firmware_bridge codec and session)",
              "mqtt": "CPU cost per received message, paho's client loop against the raw subscriber",
              "learning": "the edge.learning library against river, same rows, one process",
              "device": "the daemon as a device runs it: ready time, idle and loaded cost, broker restarts",
              "fleet": "a simulated non-IID fleet learning over rounds, bytes and server throughput",
              "units": "the systemd-analyze security exposure of the shipped units",
              "deploy": "model releases to simulated devices through one broker: bytes, time to switch, halt"}


def _bench(what: str, argv: list[str]) -> int:
    import importlib

    modname = BENCHES[what]
    return int(importlib.import_module(modname).main(argv) or 0)


def _cmd_status(args) -> int:
    from edge.config import load_config
    from edge.control import read_status
    from edge.state import runtime_dirs
    from edge.status_view import render_status

    conf = config_path(args.config)
    cfg = load_config(conf)
    dirs = runtime_dirs(cfg)  # where the daemon may have put them (its unit, the config, the fallback)
    out: dict = {"daemon": None}
    hint = "" if conf else " (the daemon's config was not given: pass --config FILE or set EDGE_CONFIG)"
    live = False
    for d in dirs:  # live, from the running daemon's socket
        try:
            out["daemon"], source = read_status(d / "edge.sock"), "live"
            live = True
            break
        except (OSError, ValueError):
            pass
    if not live:
        socks = ", ".join(str(d / "edge.sock") for d in dict.fromkeys(dirs))
        p = next((d / "status.json" for d in dirs if (d / "status.json").exists()), None)
        if p is not None:  # the file the daemon rewrites every 5 s: stale, and said so
            out["daemon"], source = json.loads(p.read_text()), f"from {p}: no daemon answers on {socks}{hint}"
        else:
            source = f"no daemon answers on {socks} and there is no status.json beside them{hint}"
    from edge.serve import serve_status

    out["serving"] = serve_status(cfg.model.cache_dir or None)
    if args.json:
        print(json.dumps({**out, "source": source, "live": live}, indent=2, default=str))
    elif out["daemon"] is None:
        print(f"not running ({source})")
    else:
        print(render_status(out["daemon"], source=source, live=live))
    return 0 if live else 1  # a script can tell "running" from "not answering"


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


def _cmd_label_sign(args) -> int:
    import time

    from edge.errors import ConfigError
    from edge.ingest.labelauth import sign_label

    p = Path(args.key).expanduser()
    try:  # the HMAC key is the key file's text (its hex digits), as the daemon reads it
        key = p.read_bytes().strip()
    except OSError as e:
        raise ConfigError(f"cannot read label key {p}: {e.strerror}") from None
    label: dict = {"t": time.time() if args.t is None else args.t}
    if args.y is not None:
        label["y"] = args.y
    else:
        label["label"] = args.label
    if args.device:
        label["device"] = args.device
    if args.stream:
        label["stream"] = args.stream
    print(sign_label(key, args.by or p.stem, label, node=args.node).decode())
    return 0


def _no_command(ap: argparse.ArgumentParser) -> int:
    print("edge: no command given. Try 'edge demo' for a first look, 'edge run --config FILE' for the daemon, "
          "or 'edge --help' for every command and the exit codes.", file=sys.stderr)
    return 1


class _Help(argparse.RawDescriptionHelpFormatter):
    """Shows every option's default (unless its help already says it), keeps the epilog's lines."""

    def _get_help_string(self, action):
        h = action.help or ""
        if action.help is argparse.SUPPRESS or ("default" in h or action.default in (None, False, "", argparse.SUPPRESS) or action.nargs == 0
                or not action.option_strings):
            return h
        return f"{h} (default: %(default)s)".lstrip()


def _finish(ap: argparse.ArgumentParser) -> None:
    """Every sub-command gets a description (its help line when it has none) and the formatter."""
    ap.formatter_class = _Help
    for act in ap._actions:
        if act.help is None and act.option_strings and act.default not in (None, False):
            act.help = "(default: %(default)s)"  # argparse shows no line for an option without help
        if isinstance(act, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in act._choices_actions}
            for name, sp in act.choices.items():
                if not sp.description and helps.get(name):
                    sp.description = helps[name][0].upper() + helps[name][1:] + "."
                _finish(sp)


def _version() -> str:
    """The installed distribution's version, else the source tree's (a checkout on PYTHONPATH)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("edge-runtime")
    except PackageNotFoundError:
        from edge import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    epilog = "exit codes:\n" + "\n".join(f"  {k:>3}  {v.replace('`', '')}" for k, v in EXIT_CODES.items())
    ap = argparse.ArgumentParser(prog="edge", description="Edge runtime: sensors in, compiled model served, head learned online.",
                                 epilog=epilog, formatter_class=_Help)
    ap.add_argument("--version", action="version", version=f"edge-runtime {_version()}")
    sub = ap.add_subparsers(dest="cmd", metavar="COMMAND")

    r = sub.add_parser("run", help="run the daemon", description=(
        "Run the daemon: read the sensors, serve the model, learn the head, publish predictions and events. "
        "SIGTERM or SIGINT stop it cleanly."))
    r.add_argument("--config", "-c", help=CONFIG_HELP)
    r.add_argument("--check", action="store_true", help="make every start-up check (config, TLS files, broker policy, state folder, model pin, label and fleet keys), "
                        "then run one window through the model, and exit with the code start-up would")
    r.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                   help="log level (default: [node] log_level of the config, info)")
    r.set_defaults(func=_cmd_run)

    d = sub.add_parser("demo", help="start a broker, simulated devices and the daemon; show a live view", description=(
        "Start a broker (unless --broker), simulated machines, a labelling operator and the daemon; show a live view; "
        "write report.json and report.png. Everything it starts and every temporary folder is removed at the end. "
        "With --fleet: a fleet server and devices with their own sensor shifts, one joining late, and two model "
        "releases in waves: a good one that every device takes, a worse one halted in its first wave."))
    d.add_argument("--seconds", type=float, default=None,
                   help="end after N seconds (default: 60, with --fleet 90; 0 without --fleet: until Ctrl-C)")
    d.add_argument("--broker", default="", help="HOST:PORT of an existing broker (default: start one on a free loopback port)")
    d.add_argument("--out", default="demo-report", help="folder for the report (JSON and PNG)")
    d.add_argument("--devices", type=int, default=3, help="simulated MQTT devices (with --fleet: devices from the start)")
    d.add_argument("--seed", type=int, default=1, help="seed of the simulated machines: the same seed, the same story")
    d.add_argument("--drift-at", type=float, default=None,
                   help="seconds until drift hits one device (default: just before the fault it confuses comes up, "
                        "about a third of the run)")
    d.add_argument("--no-live", action="store_true", help="no live terminal view (log lines instead)")
    d.add_argument("--no-serial", action="store_true", help="no simulated serial device")
    d.add_argument("--fleet", action="store_true", help="fleet sync: a server, devices with their own shifts, one joining "
                   "late; then a good model release rolled out in waves and a worse one halted")
    d.set_defaults(func=_cmd_demo)

    c = sub.add_parser("compile", help="compile a model's backbone for a backend into the cache", description=(
        "Compile a model's backbone for a backend into the artifact cache, with the parity check; with "
        "--backend auto build, gate and time every candidate and record the choice edge run serves."))
    c.add_argument("model", help="model folder or shipped model name")
    c.add_argument("--backend", default="auto", choices=["auto", "onnxruntime", "tensorrt", "torch"],
                   help="backend to build for (auto: every candidate this machine has)")
    c.add_argument("--precision", default="auto", choices=["auto", "int8", "fp16", "fp32"],
                   help="numeric precision (auto: the model's precision policy)")
    c.add_argument("--calibration", help=".npy/.npz file of windows [N, C, L] for int8 calibration")
    c.add_argument("--cache-dir", help="artifact cache (default ~/.cache/edge-runtime)")
    c.add_argument("--threads", type=int, default=1, help="inference threads used for the parity check")
    c.add_argument("--force", action="store_true", help="rebuild even if cached or refused before")
    c.add_argument("--quiet", action="store_true", help="print only the summary line (and warnings)")
    c.set_defaults(func=_cmd_compile)

    b = sub.add_parser("bench", help="benchmarks (see BENCHMARKS.md); edge bench WHAT --help for each",
                       description="Benchmarks whose figures are recorded in BENCHMARKS.md. Each takes its own options: "
                                   "edge bench WHAT --help.\n\n" + "\n".join(f"  {k:9} {v}" for k, v in BENCH_HELP.items()))
    b.add_argument("what", choices=list(BENCHES), metavar="WHAT", help="one of: " + ", ".join(BENCHES))
    b.set_defaults(func=None)

    s = sub.add_parser("status", help="the running daemon's status and the backends available", description=(
        "The running daemon's status, read live from its socket (model, backend and why, head, streams, lanes, "
        "learner, fleet sync, errors), and the backends available. Exits 1 when no daemon answers (a status "
        "file left by a stopped daemon is shown as STALE)."))
    s.add_argument("--config", "-c", help=CONFIG_HELP + "; the same rule as edge run")
    s.add_argument("--json", action="store_true", help="machine-readable JSON instead of the table")
    s.set_defaults(func=_cmd_status)

    pn = sub.add_parser("pin", help="print a model folder's content digest for [model] sha256", description=(
        "Print a model folder's content digest, the line to put in [model] sha256: edge run then refuses a "
        "folder whose files changed (exit code 3)."))
    pn.add_argument("model", help="model folder or shipped model name")
    pn.set_defaults(func=_cmd_pin)

    lk = sub.add_parser("label-key", help="create a labeller's HMAC key for signed labels ([labels] keys_dir)")
    lk.add_argument("name", help="the labeller's name (it signs as this)")
    lk.add_argument("--dir", default="/etc/edge-runtime/labellers",
                    help="the keys folder ([labels] keys_dir); the key is written there as NAME.key, mode 0600")
    lk.set_defaults(func=_cmd_label_key)

    lb = sub.add_parser("label", help="labelling tools: sign", description="Labelling tools.")
    lbs = lb.add_subparsers(dest="label_cmd", metavar="ACTION", required=True)
    ls = lbs.add_parser("sign", help="print a signed label, ready to publish on edge/<node>/labels", description=(
        "Print a signed label envelope {\"by\", \"msg\", \"sig\"} for a daemon with [labels] keys_dir: "
        "sig is HMAC-SHA256 over msg, keyed with the key file's text (its hex digits, as edge label-key wrote it)."))
    ls.add_argument("key", help="the labeller's key file (from edge label-key)")
    ls.add_argument("label", nargs="?", default="", help="the class label, e.g. imbalance (or give --y)")
    ls.add_argument("--y", type=float, help="a regression target instead of a class label")
    ls.add_argument("--node", required=True, help="the daemon's [node] name (the label is refused by any other)")
    ls.add_argument("--device", default="", help="the device it labels (empty: every device)")
    ls.add_argument("--stream", default="", help="the stream it labels (empty: every stream)")
    ls.add_argument("--t", type=float, help="the labelled moment, seconds since the epoch (default: now)")
    ls.add_argument("--by", help="the labeller's name (default: the key file's name without .key)")
    ls.set_defaults(func=_cmd_label_sign)

    # fleet sync (issue 9): `edge keys ...`, `edge fleet-server ...`
    from edge.fleet.cli import add_parsers as _fleet_parsers

    _fleet_parsers(sub)
    _finish(ap)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = build_parser()
    if len(argv) >= 2 and argv[0] == "bench" and argv[1] in BENCHES:
        # the benchmark parses its own options (and its own --help), not the parent's
        args, rest = argparse.Namespace(cmd="bench", what=argv[1]), argv[2:]
    else:
        args, rest = ap.parse_known_args(argv)
    if args.cmd is None:
        return _no_command(ap)
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
