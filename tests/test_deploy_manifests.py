"""Manifests that come while a device is busy with a release (the device part of
tests/test_deploy_device.py, a real mosquitto, the test-side publisher):

* a newer manifest of the release under its shadow test (a wave opening) does not start its
  download again (the benchmark saw one device's 4 chunks sent twice for it);
* a manifest of another release during the shadow test (its download held back) does not make
  the decision name the other release: the switch records the release that was tested, with
  its digest and folder (before, it recorded the newest manifest's release and digest with the
  tested release's folder, which the next start refuses by its pin).
"""
from __future__ import annotations

import pytest

from tests.helpers import poll
from tests.test_deploy_device import (NODE, Device, _active, _shadow_until, keys, models,  # noqa: F401  (fixtures)
                                      publisher, served)

pytestmark = pytest.mark.timeout(300)


def _asks(publisher, release: str) -> int:
    return sum(n for (r, _), n in publisher.asked.items() if r == release)


def test_a_newer_manifest_of_the_release_under_test_does_not_download_it_again(
        broker, keys, served, models, publisher, tmp_path):
    dev = Device(broker, keys, served, tmp_path)
    try:
        m = publisher.release(models["good"], release="00000000000000b7")
        poll(lambda: dev.status().get("phase") == "shadowing", 120, what="the shadow test")
        before = _asks(publisher, m.release)
        assert before == m.n_chunks

        publisher.set_state("rolling")  # the same release, a newer manifest (as when a wave opens)
        poll(lambda: dev.part.metrics()["deploy_manifests"] >= 2, 30, what="the newer manifest taken")

        assert dev.status()["phase"] == "shadowing"
        assert _asks(publisher, m.release) == before, "the download began again"
        _shadow_until(dev, lambda: dev.restarts, "the switch")
        assert _active(tmp_path)["release"] == m.release
    finally:
        dev.stop()


def test_the_decision_names_the_release_tested_not_a_newer_one(broker, keys, served, models, publisher, tmp_path):
    dev = Device(broker, keys, served, tmp_path)
    try:
        tested = publisher.release(models["good"], release="00000000000000b8")
        poll(lambda: dev.status().get("phase") == "shadowing", 120, what="the shadow test")
        publisher.answer_limit = publisher.answered  # the other release's chunks never come: it stays downloading
        other = publisher.release(models["same"], release="00000000000000b9")  # published meanwhile
        poll(lambda: "downloading" in publisher.states(other.release), 30, what="the other release taken")

        _shadow_until(dev, lambda: dev.restarts, "the switch")

        from edge.zoo import digest_files, read_folder

        a = _active(tmp_path)
        assert (a["release"], a["digest"], a["version"]) == (tested.release, tested.digest, tested.version)
        assert a["folder"].endswith(f"{tested.release}/model")
        assert digest_files(read_folder(a["folder"])) == a["digest"]  # the folder is the one the record names
    finally:
        dev.stop()
