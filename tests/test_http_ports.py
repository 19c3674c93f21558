"""HTTP ports answer over IPv4 and IPv6 alike: asyncio binds `::` as IPv6-only, so a port bound
that way refuses 127.0.0.1 (rlhf_mesh/http_site.py binds one dual-stack socket instead)."""

from __future__ import annotations

import urllib.request

import pytest

from rlhf_mesh.clients.health import wait_until_serving

from support import PYTHON, ChildServer, free_port


@pytest.mark.parametrize("host", ["127.0.0.1", "[::1]", "localhost"])
def test_the_rater_page_answers_on_every_family(host, tmp_path):
    port = free_port()
    server = ChildServer([PYTHON, "-m", "rlhf_mesh", "serve", "feedback", "--db", f"sqlite:///{tmp_path / 'fb.db'}",
                          "--rater-port", str(port)], tmp_path / "feedback.log")
    try:
        wait_until_serving(server.address, timeout_s=60, alive=server.alive)
        with urllib.request.urlopen(f"http://{host}:{port}/", timeout=10) as reply:
            assert reply.status == 200 and b"<html" in reply.read().lower()
    finally:
        assert server.stop() == 0
