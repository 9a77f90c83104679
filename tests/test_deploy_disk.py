"""A real full disk under the device's deploy folder: a tmpfs of a few chunks mounted at
``<state_dir>/<node>/deploy``, with ``[deploy] max_disk_bytes`` far above it, so the quota
lets the download start and the filesystem itself says ENOSPC.

Mounting needs root (CAP_SYS_ADMIN); where it is not permitted the tests skip and say so.
Everything else is the real device part of tests/test_deploy_device.py against a real
mosquitto and the test-side release publisher.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.helpers import fill_disk, poll, tmpfs
from tests.test_deploy_device import NODE, Device, keys, models, publisher, served  # noqa: F401  (fixtures)

pytestmark = pytest.mark.timeout(300)


def test_disk_full_mid_download_is_refused_cleanly_and_taken_again_after_space_frees(
        broker, keys, served, models, publisher, tmp_path):
    """Three chunks land, then another writer fills the disk: the next chunk's write hits ENOSPC.
    The release is refused as disk_full, its partial files are removed, the deploy thread runs on
    and nothing switches; once space frees, the same release announced again (the next manifest,
    as the server publishes when a wave opens or a rollout resumes) downloads, verifies and gates."""
    deploy_dir = tmp_path / NODE / "deploy"
    with tmpfs(deploy_dir, 256 * 1024):
        publisher.answer_limit = 3
        dev = Device(broker, keys, served, tmp_path, max_disk_bytes=2**30, request_timeout_s=1.0)
        try:
            m = publisher.release(models["good"], release="00000000000000a7")
            poll(lambda: (dev.status().get("progress") or [0])[0] >= 3, 60, what="three chunks held")
            filler = deploy_dir / "filler"
            assert fill_disk(filler) > 0
            publisher.answer_limit = None  # the chunks asked again from here on meet the full disk

            poll(lambda: publisher.refusal(m.release), 60, what="the disk_full refusal")

            assert publisher.refusal(m.release) == "disk_full"
            assert "verified" not in publisher.states(m.release)
            assert not (deploy_dir / m.release).exists(), "the partial download was left on the full disk"
            assert dev.part.agent.thread.is_alive()
            assert dev.status()["phase"] == "refused" and dev.status()["reason"] == "disk_full"
            assert dev.part.metrics()["deploy_refused"] == {"disk_full": 1}
            assert _active_pointer(deploy_dir) is None and not dev.restarts  # the current model serves on

            filler.unlink()
            publisher.set_state("rolling")  # the same release, a newer manifest
            poll(lambda: dev.status().get("phase") == "shadowing", 120, what="the release taken again and gated")
            assert "verified" in publisher.states(m.release)
            assert not dev.restarts
        finally:
            dev.stop()


def test_a_bundle_the_free_space_cannot_hold_is_refused_before_the_first_chunk(
        broker, keys, served, models, publisher, tmp_path):
    """The quota allows it but the filesystem has less room than the bundle and its unpacked
    folder: refused as disk_full before one chunk is asked for (no bytes wasted on the wire).
    After the space grows, a restart takes the same release again (its retained manifest is
    not newer, but a restart is what an operator does after freeing space), and a later
    release is downloaded and verified too."""
    deploy_dir = tmp_path / NODE / "deploy"
    with tmpfs(deploy_dir, 32 * 1024):
        dev = Device(broker, keys, served, tmp_path, max_disk_bytes=2**30)
        try:
            m = publisher.release(models["good"], release="00000000000000a8")
            poll(lambda: publisher.refusal(m.release), 60, what="the disk_full refusal")
            assert publisher.refusal(m.release) == "disk_full"
            assert not [k for k in publisher.asked if k[0] == m.release], "chunks were asked for a bundle that cannot fit"
            assert dev.part.agent.thread.is_alive()
        finally:
            dev.stop()

        subprocess.run(["mount", "-o", "remount,size=1m", str(deploy_dir)], check=True)
        dev = Device(broker, keys, served, tmp_path, max_disk_bytes=2**30)
        try:
            poll(lambda: "verified" in publisher.states(m.release), 120, what="the same release verified after a restart")
            m2 = publisher.release(models["good"], release="00000000000000a9")
            poll(lambda: "verified" in publisher.states(m2.release), 120, what="the later release verified")
            assert publisher.refusal(m2.release) is None
        finally:
            dev.stop()


def _active_pointer(deploy_dir: Path):
    p = deploy_dir / "active.json"
    return p.read_text() if p.exists() else None


def test_tmpfs_helper_unmounts(tmp_path):
    """The helper leaves no mount behind (a test that failed inside it must not leave a tmpfs)."""
    where = tmp_path / "m"
    with tmpfs(where, 16 * 1024):
        assert os.path.ismount(where)
    assert not os.path.ismount(where)
