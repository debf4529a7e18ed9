"""The simulated round time on small cases computed by hand."""

import pytest

from decaf_ray.simtime import TimeModel

MB = 1_000_000   # 1e6 bytes = 8 Mbit: 0.08 s at 100 Mbit/s


def ring3():
    return {0: ([0, 1, 2], [1 / 3] * 3), 1: ([0, 1, 2], [1 / 3] * 3), 2: ([0, 1, 2], [1 / 3] * 3)}


def test_compute_plus_latency_plus_bytes_over_bandwidth():
    tm = TimeModel(3, step_s=0.05, latency_s=0.01, bandwidth_mbps=100)
    # 10 steps: 0.5 s; a 1 MB message: 0.01 + 0.08 s
    assert tm.round_seconds([0, 1, 2], 10, ring3(), {0: MB, 1: MB, 2: MB}) == pytest.approx(0.59)
    # the slowest arrival counts: agent 2 sends 2 MB, so 0.5 + 0.01 + 0.16
    assert tm.round_seconds([0, 1, 2], 10, ring3(), {0: MB, 1: MB, 2: 2 * MB}) == \
        pytest.approx(0.67)


def test_a_straggler_delays_itself_and_its_neighbours_only():
    tm = TimeModel(4, step_s=0.1, latency_s=0.0, bandwidth_mbps=100, speeds=[1, 1, 1, 0.5])
    path = {0: ([0, 1], [.5, .5]), 1: ([0, 1, 2], [1 / 3] * 3), 2: ([1, 2, 3], [1 / 3] * 3),
            3: ([2, 3], [.5, .5])}
    t = tm.agent_seconds([0, 1, 2, 3], 10, path, {i: MB for i in range(4)})
    # compute: 1 s, agent 3: 2 s; each message 0.08 s
    assert t[0] == pytest.approx(1.08)
    assert t[1] == pytest.approx(1.08)
    assert t[2] == pytest.approx(2.08)       # waits for 3's message
    assert t[3] == pytest.approx(2.0)        # 2's message arrived long before 3 finished
    assert tm.round_seconds([0, 1, 2, 3], 10, path, {i: MB for i in range(4)}) == \
        pytest.approx(2.08)


def test_steps_per_agent_inactive_and_isolated_agents():
    tm = TimeModel(3, step_s=0.1, latency_s=0.5, bandwidth_mbps=100)
    steps = {0: 10, 1: 2, 2: 30}
    # agent 2 is inactive: 0 and 1 do not wait for it; agent 1 alone: compute only
    hood = {0: ([0, 1, 2], [1 / 3] * 3), 1: ([1], [1.0])}
    t = tm.agent_seconds([0, 1], steps, hood, {0: MB, 1: MB, 2: MB})
    assert set(t) == {0, 1}
    assert t[0] == pytest.approx(max(1.0, 0.2 + 0.5 + 0.08))
    assert t[1] == pytest.approx(0.2)
    # a zero weight is no message
    assert tm.agent_seconds([0, 1], 10, {0: ([0, 1], [1.0, 0.0])}, {0: MB, 1: MB})[0] == \
        pytest.approx(1.0)
    assert tm.round_seconds([], 10, {}, {}) == 0.0


def test_server_uploads_then_broadcasts():
    tm = TimeModel(2, step_s=0.1, latency_s=0.01, bandwidth_mbps=80, speeds=[1.0, 0.5])
    # up: max(1 + 0.01 + 0.1, 2 + 0.01 + 0.1) = 2.11; down (1 MB): 0.01 + 0.1
    assert tm.round_seconds([0, 1], 10, {}, {0: MB, 1: MB}, server=True) == pytest.approx(2.22)
    assert tm.round_seconds([0, 1], 10, {}, {0: MB, 1: MB}, server=True,
                            broadcast_bytes=2 * MB) == pytest.approx(2.32)
    assert tm.round_seconds([0], 10, {}, {0: MB}, server=True) == pytest.approx(1.22)


def test_spreads_are_seeded_fixed_and_order_free():
    a = TimeModel(5, 0.1, 0.01, 100, speed_sigma=0.5, link_sigma=0.5, seed=7)
    b = TimeModel(5, 0.1, 0.01, 100, speed_sigma=0.5, link_sigma=0.5, seed=7)
    c = TimeModel(5, 0.1, 0.01, 100, speed_sigma=0.5, link_sigma=0.5, seed=8)
    assert (a.speeds == b.speeds).all() and not (a.speeds == c.speeds).all()
    assert len(set(a.speeds)) == 5
    first = a.link(3, 1)
    b.link(0, 4), b.link(2, 3)                       # other pairs drawn first
    assert b.link(1, 3) == first == a.link(1, 3)     # undirected, order free
    assert a.link(0, 1) != a.link(0, 2)
    flat = TimeModel(5, 0.1, 0.01, 100)
    assert flat.link(0, 4) == (0.01, 100) and (flat.speeds == 1).all()


def test_bad_arguments():
    with pytest.raises(ValueError, match="bandwidth_mbps"):
        TimeModel(3, 0.1, 0.01, 0)
    with pytest.raises(ValueError, match="speeds"):
        TimeModel(3, 0.1, 0.01, 10, speeds=[1, 0, 1])
