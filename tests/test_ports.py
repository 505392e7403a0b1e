"""Port picking that does not race with the kernel's own choices (spin_megatron/ports.py)."""

import random
import socket

from spin_megatron import ports


def test_picked_ports_are_free_and_below_the_ephemeral_range():
    low, _ = ports.ephemeral_range()
    picked = [ports.pick_free_port(span=3) for _ in range(20)]
    assert all(ports.LOWEST <= p and p + 2 < low for p in picked)
    assert len(set(picked)) > 10  # random, so that two processes picking at once rarely meet
    assert all(ports.port_free("127.0.0.1", p + i) for p in picked for i in range(3))


def test_a_listening_port_is_taken_and_a_free_span_skips_it(monkeypatch):
    with socket.socket() as server:
        server.bind(("0.0.0.0", ports.pick_free_port()))
        server.listen()
        port = server.getsockname()[1]
        assert not ports.port_free("127.0.0.1", port) and not ports.port_free("0.0.0.0", port)
        assert not ports.wait_port_free("127.0.0.1", port, timeout_s=0.2)
        # A draw that lands on the taken port (or a span across it) draws again.
        draws = iter([port - 1, port, port + 1])
        rng = random.Random()
        monkeypatch.setattr(rng, "choice", lambda _: next(draws))
        assert ports.pick_free_port(span=2, rng=rng) == port + 1
    assert ports.wait_port_free("127.0.0.1", port, timeout_s=5)


def test_without_the_kernel_setting_the_linux_default_range_is_assumed(monkeypatch, tmp_path):
    monkeypatch.setattr(ports, "_EPHEMERAL", tmp_path / "absent")
    assert ports.ephemeral_range() == (32768, 60999)
