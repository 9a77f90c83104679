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


def test_a_timeout_asks_again_for_one_chunk_then_for_all_and_doubles_when_nothing_comes(tmp_path):
    d, _, now = _download(tmp_path)
    assert _asked(d.next_asks()) == [0, 1, 2, 3]
    now[0] = 4.9
    assert d.next_asks() == []
    now[0] = 5.1
    assert _asked(d.next_asks()) == [0]  # a probe; 1-3 wait on it
    now[0] = 10.2  # the probe is due too: nothing comes at all
    assert _asked(d.next_asks()) == [0, 1, 2, 3] and d.asks.backoff == 2
    now[0] = 10.2 + 9.9  # the timeout is 10 s now
    assert d.next_asks() == []
    now[0] = 10.2 + 10.1
    assert _asked(d.next_asks()) == [0]


def test_late_originals_after_the_probe_are_not_asked_for_again(tmp_path):
    """The bench's 8.4%: the answers were late, not lost. One probe chunk is the most asked twice."""
    d, bundle, now = _download(tmp_path, n_chunks=4)
    d.next_asks()
    now[0] = 5.1
    assert _asked(d.next_asks()) == [0]
    for k, i in enumerate([0, 1, 2, 3]):  # the late originals, back to back
        now[0] = 6.0 + 0.01 * k
        assert d.write(i, rc.chunk_bytes(bundle, i, CHUNK))
        assert d.next_asks() == []
    assert not d.write(0, rc.chunk_bytes(bundle, 0, CHUNK))  # the probe's answer: a duplicate, dropped
    assert d.complete and d.asks.reasked == 1


def test_what_does_not_follow_the_probes_answer_was_lost_and_is_asked_again_at_once(tmp_path):
    d, bundle, now = _download(tmp_path, n_chunks=4)
    d.next_asks()
    now[0] = 5.1
    d.next_asks()  # the probe: 0
    now[0] = 6.0
    assert d.write(0, rc.chunk_bytes(bundle, 0, CHUNK))  # its answer, 0.9 s after
    now[0] = 6.5
    assert d.next_asks() == []  # the originals might be right behind it
    now[0] = 7.0  # one probe round trip later: they were lost
    assert _asked(d.next_asks()) == [1, 2, 3]


def test_chunks_coming_for_other_asks_keep_an_ask_alive(tmp_path):
    d, bundle, now = _download(tmp_path)
    d.next_asks()
    for k, i in enumerate([1, 2, 3]):  # a busy server answers slowly, one every 3 s; chunk 0 comes last
        now[0] = 3.0 * (k + 1)
        assert d.write(i, rc.chunk_bytes(bundle, i, CHUNK))
        assert _asked(d.next_asks()) == [4 + k]  # only the new room is asked for, never chunk 0 again
    assert d.asks.reasked == 0
    now[0] = 12.0
    assert d.write(0, rc.chunk_bytes(bundle, 0, CHUNK)) and d.asks.reasked == 0


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
        nxt = asked[-1]
    assert 0 in asked and 20.0 < now[0] <= 21.0  # four timeouts of 5 s after its ask


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0.0, 12.0), st.booleans()), min_size=1, max_size=80), st.integers(1, 6))
def test_asks_stay_bounded_never_name_a_held_chunk_and_always_come_again(steps, in_flight):
    """Whatever arrives when: at most ``in_flight`` in flight, no held chunk asked, and a missing
    chunk is never left unasked for longer than the longest timeout and one probe round."""
    from edge.deploy.asks import Asks

    a, now, held, n = Asks(timeout_s=1.0, in_flight=in_flight), 0.0, set(), 12
    last_ask = {}
    for dt, deliver in steps:
        now += dt
        if deliver and a.asked:
            i = min(a.asked)
            held.add(i)
            a.arrived(i, now=now)
        missing = [i for i in range(n) if i not in held]
        got = a.next_asks(missing, now=now)
        assert not set(got) & held and len(a.asked) <= in_flight
        for i in got:
            last_ask[i] = now
    for _ in range(40):  # then nothing arrives: everything in flight is asked again in bounded time
        now += 1.0
        for i in a.next_asks([i for i in range(n) if i not in held], now=now):
            last_ask[i] = now
    assert all(now - last_ask[i] <= 2 * 8.0 + 2.0 for i in a.asked)


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
