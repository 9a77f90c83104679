"""`edge bench units`: the ``systemd-analyze security`` exposure of the shipped units.

    edge bench units --out bench/out/units.json

Not a timing: systemd's own score (0 = locked down, 10 = exposed) of each unit file,
read offline, with the checks that still count against it. The target is <= 2.0.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
from pathlib import Path

from edge.errors import EdgeError

UNITS = Path(__file__).resolve().parent.parent.parent / "deploy" / "systemd"
_OVERALL = re.compile(r"Overall exposure level for (\S+): ([0-9.]+) (\S+)")


def parse_overall(text: str) -> tuple[float, str]:
    """The overall exposure and rating from ``systemd-analyze security``'s text output.

    >>> parse_overall("→ Overall exposure level for edge-runtime.service: 1.6 OK 🙂")
    (1.6, 'OK')
    """
    m = _OVERALL.search(text)
    if not m:
        raise EdgeError("systemd-analyze security printed no overall exposure level")
    return float(m.group(2)), m.group(3)


def score(unit: Path) -> dict:
    """Exposure, rating and the checks that still add to it, for one unit file."""
    exe = shutil.which("systemd-analyze")
    if not exe:
        raise EdgeError("systemd-analyze is not installed (apt-get install systemd)")
    base = [exe, "security", "--offline=yes", "--no-pager"]
    text = subprocess.run(base + [str(unit)], capture_output=True, text=True, check=True, timeout=120).stdout
    checks = json.loads(subprocess.run(base + ["--json=short", str(unit)], capture_output=True, text=True,
                                       check=True, timeout=120).stdout)
    exposure, rating = parse_overall(text)
    open_checks = [{"name": c["name"], "exposure": float(c["exposure"])} for c in checks
                   if not c["set"] and c.get("exposure")]
    return {"exposure": exposure, "rating": rating, "open": sorted(open_checks, key=lambda c: -c["exposure"])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="edge bench units", description=__doc__.splitlines()[0].replace("`", ""))
    ap.add_argument("units", nargs="*", help="unit files (default: deploy/systemd/*.service of this tree)")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)
    units = [Path(u) for u in args.units] or sorted(UNITS.glob("*.service"))
    version = subprocess.run(["systemd-analyze", "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    res = {"command": "systemd-analyze security --offline=yes UNIT", "systemd": version[0] if version else "",
           "target": 2.0, "units": {}}
    for u in units:
        r = res["units"][u.name] = score(u)
        print(f"{u.name}: {r['exposure']} {r['rating']} (target <= 2.0); open: "
              + ", ".join(f"{c['name']} {c['exposure']}" for c in r["open"]))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
