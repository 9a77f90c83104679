"""The naive baseline of the pipeline benchmark: what one would write in an afternoon.

A paho callback decodes each message with ``json``, appends the sample to a per-stream
list, and when a window is full runs the eager PyTorch model (backbone and head) on that
one window and publishes the prediction, all on paho's network thread.
"""
from __future__ import annotations

import json
import sys

import paho.mqtt.client as mqtt
import torch

from edge.zoo import resolve_model


def main(argv: list[str]) -> int:
    host, port, model = argv[0], int(argv[1]), argv[2]
    torch.set_num_threads(1)
    mf = resolve_model(model)
    backbone, head = mf.build()
    L = mf.manifest.window
    classes = mf.manifest.classes
    buffers: dict[str, list] = {}

    def on_message(c, u, m):
        d = json.loads(m.payload)
        dev = m.topic.split("/")[1]
        buf = buffers.setdefault(dev, [])
        buf.append((d["t"], d["v"]))
        if len(buf) == L:
            x = torch.tensor([[s[1][ch] for s in buf] for ch in range(len(buf[0][1]))], dtype=torch.float32)[None]
            with torch.no_grad():
                p = torch.softmax(head(backbone(x)), dim=1)[0]
            k = int(p.argmax())
            c.publish(f"naive/predictions/{dev}", json.dumps({"t": buf[-1][0], "t_start": buf[0][0], "prediction": classes[k],
                                                              "scores": p.tolist()}))
            buffers[dev] = []

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="naive-baseline", protocol=mqtt.MQTTv311)
    c.on_message = on_message
    c.on_connect = lambda c, *a: c.subscribe("bench/+/accel")
    c.connect(host, port)
    print("ready", flush=True)
    c.loop_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
