"""The daemon's own start-up: time to READY and RSS of a real ``edge run`` process.

Starts a broker, then ``edge run -c CONFIG`` as a child with ``NOTIFY_SOCKET`` pointing
at a datagram socket of ours, exactly as systemd (``Type=notify``) would; the time to
READY is from ``exec`` to the ``READY=1`` datagram, and the RSS (``VmRSS``, ``VmHWM``)
is read from ``/proc/<pid>/status`` right then, so it is the daemon's, not a worker's.
A first run (cold cache: the measured choice builds every candidate) is reported apart
from the warm runs that follow it.

    python -m edge.bench.daemon_start --model vibration --runs 3 --out bench/out/daemon-start.json
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _proc_status(pid: int) -> dict[str, float]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
    return out


def _torch_mapped(pid: int) -> bool:
    """Whether torch's shared library is mapped into the process (so torch was imported)."""
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def one_run(config: Path, env: dict, timeout: float) -> dict:
    sock_path = Path(tempfile.mkdtemp(prefix="edge-notify-")) / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(sock_path))
        s.settimeout(timeout)
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "edge.cli", "run", "-c", str(config)],
                                env={**env, "NOTIFY_SOCKET": str(sock_path)}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        try:
            while True:
                msg = s.recv(4096).decode()
                if "READY=1" in msg:
                    ready_s = time.perf_counter() - t0
                    break
            time.sleep(0.5)  # let the threads reach their steady state before reading RSS
            mem = _proc_status(proc.pid)
            torch_mapped = _torch_mapped(proc.pid)
        finally:
            proc.terminate()
            try:
                _, err = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
    served = next((ln for ln in err.splitlines() if "backbone:" in ln), "")
    return {"ready_s": ready_s, "rss_mb": mem.get("VmRSS"), "peak_rss_mb": mem.get("VmHWM"),
            "torch_loaded": torch_mapped, "served": served.split("backbone:", 1)[-1].strip()[:400]}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(prog="python -m edge.bench.daemon_start", description=__doc__.split("\n\n")[0].replace("`", ""))
    ap.add_argument("--model", default="vibration")
    ap.add_argument("--runs", type=int, default=3, help="warm runs after the first")
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--out", default="bench/out/daemon-start.json")
    ap.add_argument("--no-adapt", action="store_true", help="[adapt] enabled = false: the serving path alone")
    args = ap.parse_args(argv)
    from edge.broker import BrokerProcess

    work = Path(tempfile.mkdtemp(prefix="edge-daemon-start-"))
    with BrokerProcess(kind="auto") as broker:
        config = work / "edge.toml"
        config.write_text(f'[node]\nname = "bench"\nstate_dir = "{work / "state"}"\n\n'
                          f'[mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\n\n'
                          f'[model]\npath = "{args.model}"\ncache_dir = "{work / "cache"}"\n'
                          + ("\n[adapt]\nenabled = false\n" if args.no_adapt else ""))
        env = dict(os.environ)
        first = one_run(config, env, args.timeout)
        warm = [one_run(config, env, args.timeout) for _ in range(args.runs)]
    report = {"command": "python -m edge.bench.daemon_start " + shlex.join(argv), "model": args.model,
              "adapt": not args.no_adapt,
              "first_start_cold_cache": first, "warm": warm,
              "warm_median_ready_s": sorted(r["ready_s"] for r in warm)[len(warm) // 2] if warm else None,
              "warm_max_rss_mb": max((r["rss_mb"] for r in warm), default=None)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "warm"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
