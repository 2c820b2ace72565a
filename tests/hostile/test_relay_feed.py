"""The standalone-relay feed fails closed: an empty, short or whitespace relay.secret stops both programs
with one line; a feed client speaks only for the one region it announced (never region 1, never one
another relay holds), so every node's relay map keeps the real regions; a region URL meshd cannot use is
refused where it enters (the feed) and where it is used (meshd's map decoder), and costs meshd only that
region."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from coordinator.relay.standalone import Standalone
from meshd.proto import netmap, relay, relayfeed
from meshd.proto.netmap import RelayRegion
from meshd.relay.manager import RelayManager
from tests.coordinator.conftest import Coord, coord, core, settings  # noqa: F401 - fixtures
from tests.coordinator.test_relay import relayed  # noqa: F401 - fixture
from tests.coordinator.test_relay_standalone import region2  # noqa: F401 - fixture
from tests.eventually import eventually_async

pytestmark = [pytest.mark.hostile, pytest.mark.timeout(60)]

BIN = Path(sys.executable).parent / "coordinator"
BAD_SECRETS = {"empty": "", "newline only": "\n", "short": "0123456789abcde\n", "whitespace": "   \t  \n"}


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'coordinator.db'}"


# -- the secret ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("content", list(BAD_SECRETS.values()), ids=list(BAD_SECRETS))
def test_coordinator_serve_refuses_a_bad_relay_secret_with_one_line(tmp_path: Path, content: str) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "relay.secret").write_text(content)
    (state / "relay.secret").chmod(0o600)
    r = subprocess.run(
        [str(BIN), "serve", "--listen", "127.0.0.1:0", "--state-dir", str(state), "--stun-port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1, (r.returncode, r.stderr)
    [line] = r.stderr.strip().splitlines()[-1:]
    assert line.startswith("error: relay secret in ") and "shorter than 16 bytes" in line, r.stderr
    assert "Traceback" not in r.stderr
    assert (state / "relay.secret").read_text() == content  # never replaced behind the admin's back


@pytest.mark.parametrize("content", list(BAD_SECRETS.values()), ids=list(BAD_SECRETS))
def test_relay_serve_refuses_a_bad_secret_file_or_variable(tmp_path: Path, content: str) -> None:
    secret = tmp_path / "relay.secret"
    secret.write_text(content)
    base = [str(BIN), "relay", "serve", "--listen", "127.0.0.1:0", "--coordinator", "http://127.0.0.1:9"]
    for args, env in (([*base, "--secret-file", str(secret)], {}), (base, {"RELAY_SECRET": content})):
        r = subprocess.run(args, capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin", **env})
        assert r.returncode == 1, (r.returncode, r.stderr)
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: relay secret in "), r.stderr
        assert "shorter than 16 bytes" in r.stderr


def test_a_made_secret_is_long_and_private(tmp_path: Path) -> None:
    from coordinator.relay import secret

    value = secret.load_or_create(tmp_path)
    assert len(value) >= secret.MIN_SECRET and (tmp_path / "relay.secret").stat().st_mode & 0o077 == 0
    assert secret.load_or_create(tmp_path) == value
    assert [p.name for p in tmp_path.iterdir()] == ["relay.secret"]  # no temporary file left


# -- one feed, one region ----------------------------------------------------------------------------------
async def announce(c: Coord, *messages: relayfeed.ToCoordinator) -> str:
    """An operator holding the shared secret runs its own feed client: the close reason it gets (or
    "open" when the coordinator kept the connection)."""
    secret = (c.core.settings.state_dir / "relay.secret").read_text().strip()
    url = relay.websocket_url(c.url, relayfeed.FEED_PATH)
    async with connect(url, additional_headers={"Authorization": f"Bearer {secret}"}) as ws:
        await ws.recv()  # keys
        await ws.recv()  # valid
        for m in messages:
            await ws.send(relayfeed.encode(m))
        try:
            async with asyncio.timeout(1.0):
                await ws.recv()  # the coordinator sends nothing more unless it closes
        except ConnectionClosed as exc:
            return exc.rcvd.reason if exc.rcvd else "closed"
        except TimeoutError:
            pass
    return "open"


async def test_a_feed_client_cannot_speak_for_a_region_it_does_not_hold(
    relayed: Coord,  # noqa: F811
    region2: Standalone,  # noqa: F811
) -> None:
    real = tuple(relayed.core.state.relays)
    assert [r.id for r in real] == [1, 2]
    evil = "http://evil.example:80"
    attempts = [
        (relayfeed.Region(RelayRegion(1, "evil", evil, 0)),),  # the embedded region, in every node's map
        (relayfeed.Region(RelayRegion(2, "evil", evil, 0)),),  # a region another relay holds
        # bound to region 3, then speaking for region 2 or for the embedded one
        (relayfeed.Region(RelayRegion(3, "three", "http://127.0.0.1:3", 0)), relayfeed.Attach(7, 2)),
        (
            relayfeed.Region(RelayRegion(4, "four", "http://127.0.0.1:4", 0)),
            relayfeed.Region(RelayRegion(1, "x", evil, 0)),
        ),
        (relayfeed.Attach(1, 2),),  # before announcing any region
    ]
    for messages in attempts:
        reason = await announce(relayed, *messages)
        assert reason != "open" and ("region" in reason or "first message" in reason), (messages, reason)
        assert all(r in relayed.core.state.relays for r in real)  # the map keeps the real regions
        assert all(r.url != evil for r in relayed.core.state.relays)
    assert relayed.core.state.peers == {} or all(p.relay_home != 2 for p in relayed.core.state.peers.values())

    # positive control: a feed client for a free region joins the map and keeps its connection
    own = RelayRegion(5, "five", "http://127.0.0.1:5", 0)
    assert await announce(relayed, relayfeed.Region(own)) == "open"
    assert own in relayed.core.state.relays


# -- region URLs ------------------------------------------------------------------------------------------
async def test_a_bad_region_url_never_enters_the_map(
    relayed: Coord,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "coordinator.relay")
    before = tuple(relayed.core.state.relays)
    bad = json.dumps({"type": "region", "id": 6, "name": "six", "url": "http://[", "stun_port": 0})
    secret = (relayed.core.settings.state_dir / "relay.secret").read_text().strip()
    url = relay.websocket_url(relayed.url, relayfeed.FEED_PATH)
    async with connect(url, additional_headers={"Authorization": f"Bearer {secret}"}) as ws:
        await ws.recv()
        await ws.recv()
        await ws.send(bad)
        await eventually_async(lambda: "url does not parse" in caplog.text, within=3, what="refused, logged")
    assert tuple(relayed.core.state.relays) == before


def test_meshd_map_decoder_refuses_a_region_it_cannot_use() -> None:
    for url in ("http://[", "http://h:99999", "ftp://h", "http://h/x"):
        region = {"id": 2, "name": "r", "url": url, "stun_port": 0}
        with pytest.raises(netmap.NetmapError, match="relay 2"):
            netmap.relay_from_json(region)
    assert netmap.relay_from_json({"id": 2, "name": "r", "url": "http://h:1", "stun_port": 0}).url == "http://h:1"


async def test_meshd_ignores_a_bad_region_and_keeps_the_others(caplog: pytest.LogCaptureFixture) -> None:
    """What used to kill the stream task (``urlsplit('http://[')`` raising ValueError): now that region is
    skipped and logged, the relay client keeps the others."""
    m = RelayManager(wg_key=bytes(32), wg_port=9, tickets=_no_tickets)
    try:
        m.set_regions([RelayRegion(1, "ok", "http://127.0.0.1:9", 0), RelayRegion(2, "bad", "http://[", 0)])
        assert list(m.regions) == [1] and "ignoring region 2: url does not parse" in caplog.text
    finally:
        await m.close()


async def _no_tickets(region_id: int) -> object:
    raise AssertionError("not started: no ticket is needed")
