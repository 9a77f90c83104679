"""What a device forgets of a class it never gets a label of (BENCHMARKS.md, fleet demo).

    PYTHONPATH=. python bench/unseen_class.py [--out bench/out/unseen_class.json]

The fleet demo's training devices (``edge.bench.fleet._device_data``: each its own shift,
a skewed class mix drawn from Dirichlet(0.5), a balanced test set of its own shift), each
learning alone with the daemon's ``Learner`` from its 650 labels, the shipped head as its
global head, at the demo's 10 labels a second on the learner's clock; once with plain
cross-entropy (``class_evidence = 0``), once with the default class evidence. Reported
per device: the class mix of its labels, and at the start and the end the served head's
(champion's) per-class recall, balanced accuracy and accuracy on the device's own class
mix (the test set's per-class recalls weighted by the label mix).
"""
from __future__ import annotations

import argparse
import collections

import numpy as np


def _report(snap, zt, yt, mix) -> dict:
    pred = snap.predict(zt).argmax(1)
    recall = [float((pred[yt == c] == c).mean()) for c in range(len(mix))]
    return {"recall": [round(r, 3) for r in recall], "balanced_accuracy": round(float(np.mean(recall)), 3),
            "own_mix_accuracy": round(float(np.dot(mix, recall)), 3)}


def main(argv=None) -> int:
    import torch

    from edge.adapt.learner import Learner
    from edge.bench.fleet import _conditions, _device_data
    from edge.bench.machine import cpu_info, write_result
    from edge.config import AdaptConfig
    from edge.zoo import resolve_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=4)
    ap.add_argument("--labels", type=int, default=650, help="the fleet demo's 60 s at 10 labels/s, plus 50")
    ap.add_argument("--out", default="bench/out/unseen_class.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model = resolve_model("vibration")
    bb, _ = model.build()
    _, head_sd = model.state_dicts()
    g = {k: v.numpy() for k, v in head_sd.items()}
    k = len(model.manifest.classes)
    out = []
    for i, (name, _, cond) in enumerate(_conditions(args.devices + 1, 7)[: args.devices]):
        z, y, zt, yt = _device_data(bb, cond, n_train=args.labels, n_test=200, seed=700 + i, classes=k, alpha=0.5)
        counts = np.bincount(y, minlength=k)
        mix = counts / counts.sum()
        row = {"device": f"dev-{i}", "shift": name, "label_counts": counts.tolist()}
        for evidence in (0, AdaptConfig().class_evidence):  # plain cross-entropy, then the default
            t = [0.0]  # the demo's 10 labels a second, on the learner's clock (its training budget)
            lr = Learner(task="classification", feature_size=z.shape[1], classes=model.manifest.classes, global_head=g,
                         config=AdaptConfig(seed=0, class_evidence=evidence), clock=lambda: t[0])
            row["start"] = start = _report(lr.champion, zt, yt, mix)
            for a, b in zip(z, y):
                t[0] += 0.1
                lr.learn_one(a, int(b))
            end = _report(lr.champion, zt, yt, mix)
            row[f"class_evidence={evidence}"] = {"end": end, "champion": lr.champion.version, "swaps": dict(collections.Counter(
                {"promotions": lr.counters["promotions"], "refreshes": lr.counters["refreshes"], "rollbacks": lr.counters["rollbacks"]}))}
            print(f"{row['device']} ({name}) labels per class {counts.tolist()}, class_evidence={evidence}: recall "
                  f"{start['recall']} -> {end['recall']}, balanced {start['balanced_accuracy']} -> {end['balanced_accuracy']}, "
                  f"own mix {start['own_mix_accuracy']} -> {end['own_mix_accuracy']}")
        out.append(row)
    write_result({"command": "PYTHONPATH=. python bench/unseen_class.py", "cpu": cpu_info(), "devices": out}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
