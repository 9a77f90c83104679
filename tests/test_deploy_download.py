"""The device's re-ask rule (edge.deploy.download.Download.next_asks) on a fake clock: an ask is
made again only when nothing new came for the timeout, each timeout without news doubles the
next, chunks arriving for other asks keep an ask alive (a busy server, not a lost answer), and
a late duplicate is discarded without writing anything. Real files in a temp folder.
"""
from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st

from edge.deploy.download import Download
from edge.fleet import release_codec as rc

CHUNK = 4096


def _download(tmp_path, n_chunks: int = 8, *, in_flight: int = 4, timeout_s: float = 5.0):
    files = {"manifest.toml": b'name = "x"\nversion = "1"\n', "blob.bin": os.urandom(CHUNK * n_chunks - 200)}
    bundle = rc.pack_bundle(files)
    m = rc.make_manifest(fleet="f", model="x", release="00000000000000aa", seq=1, version="1", files=files,
                         bundle=bundle, chunk_size=CHUNK, waves=[100])
    now = [0.0]
    d = Download(m, tmp_path / m.release, root=tmp_path, quota=2**30, in_flight=in_flight, timeout_s=timeout_s,
                 clock=lambda: now[0])
    d.prepare()
    return d, bundle, now


def _asked(runs) -> list[int]:
    return [i for s, c in runs for i in range(s, s + c)]


def test_an_unanswered_ask_is_made_again_after_the_timeout_then_after_twice_it(tmp_path):
    d, _, now = _download(tmp_path)
    assert _asked(d.next_asks()) == [0, 1, 2, 3]
    now[0] = 4.9
    assert d.next_asks() == []
    now[0] = 5.1
    assert _asked(d.next_asks()) == [0, 1, 2, 3] and d.reasked == 4
    now[0] = 5.1 + 9.9  # the next timeout is 10 s: nothing came since
    assert d.next_asks() == []
    now[0] = 5.1 + 10.1
    assert _asked(d.next_asks()) == [0, 1, 2, 3]


def test_chunks_coming_for_other_asks_keep_an_ask_alive_and_a_new_chunk_resets_the_backoff(tmp_path):
    d, bundle, now = _download(tmp_path)
    d.next_asks()
    for k, i in enumerate([1, 2, 3]):  # a busy server answers slowly, one every 3 s; chunk 0 comes last
        now[0] = 3.0 * (k + 1)
        assert d.write(i, rc.chunk_bytes(bundle, i, CHUNK))
        assert _asked(d.next_asks()) == [4 + k]  # only the new room is asked for, never chunk 0 again
    assert d.reasked == 0 and d.backoff == 1
    now[0] = 9.0 + 5.1  # then nothing for a timeout: chunk 0 and the rest are overdue
    assert 0 in _asked(d.next_asks()) and d.backoff == 2
    now[0] = 15.0
    assert d.write(0, rc.chunk_bytes(bundle, 0, CHUNK)) and d.backoff == 1


def test_a_chunk_outstanding_for_four_timeouts_is_asked_again_though_others_come(tmp_path):
    d, bundle, now = _download(tmp_path, n_chunks=40, in_flight=2)
    d.next_asks()  # 0 and 1; 0 is lost, the others keep coming
    nxt = 1
    while now[0] < 30.0:
        now[0] += 1.0
        assert d.write(nxt, rc.chunk_bytes(bundle, nxt, CHUNK))
        asked = _asked(d.next_asks())
        if 0 in asked:
            break
        nxt = asked[0]
    assert 0 in asked and 20.0 < now[0] <= 21.0  # four timeouts of 5 s after its ask


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 7), min_size=1, max_size=30))
def test_a_duplicate_chunk_is_discarded_without_writing(tmp_path_factory, order):
    d, bundle, now = _download(tmp_path_factory.mktemp("dl"))
    seen = set()
    for i in order:
        before = (d.part.stat().st_mtime_ns, d.held_path.stat().st_ino)  # held.json is replaced by rename
        new = d.write(i, rc.chunk_bytes(bundle, i, CHUNK))
        assert new == (i not in seen)
        if not new:
            assert (d.part.stat().st_mtime_ns, d.held_path.stat().st_ino) == before
        seen.add(i)
    assert d.held == seen
