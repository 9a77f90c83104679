"""`edge bench mqtt` runs end to end on a tiny load (a smoke test: no figure is checked)."""
from __future__ import annotations

import json
import shutil

import pytest

from edge.bench import mqtt as bench

pytestmark = pytest.mark.timeout(180)


@pytest.mark.skipif(not shutil.which("mosquitto"), reason="needs mosquitto")
def test_bench_mqtt_writes_both_readers_figures(tmp_path):
    out = tmp_path / "mqtt.json"
    assert bench.main(["--messages", "300", "--repeat", "1", "--qos", "0,1", "--idle-s", "20", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["machine"]["model"] and "features" in res["machine"]
    for case in ("qos0", "qos1"):
        med = res["cases"][case]["median"]
        for reader in ("paho", "raw"):
            run = res["cases"][case]["runs"][reader][0]
            assert run["received"] == run["expected"] == 300
            assert run["thread_cpu_s"] > 0 and med[reader]["messages_per_cpu_s"] > 0
        assert med["ratio_raw_over_paho_messages_per_cpu_s"] > 0
