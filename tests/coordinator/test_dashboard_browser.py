"""The dashboard in a real headless Chromium (Debian's chromium + chromium-driver, driven by Selenium).

A real `coordinator serve` on loopback, real map streams from node clients: log in with a token, approve
a pending node with its confirmation, watch a node go offline, read the policy tests and the audit
trail. Every page is saved as a PNG in ``$DASHBOARD_SCREENSHOTS`` (default ``build/screenshots``);
docs/screenshots/ holds copies.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from nacl.signing import SigningKey

from meshd import pathreport
from meshd.control import ControlClient, Enrollment, NodeKeys, PendingApproval
from meshd.pathreport import Facts, PathEntry
from meshd.relay import link as rlink
from tests.coordinator.test_cli import cli, free_port, start_server, stop_server
from tests.eventually import eventually

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
SHOTS = Path(os.environ.get("DASHBOARD_SCREENSHOTS", Path(__file__).parents[2] / "build" / "screenshots"))

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None or DRIVER is None,
        reason="needs Debian's chromium and chromium-driver (scripts/setup)",
    ),
]

RELAYED = 20  #: packets of 1200 bytes relayed between two nodes, for the relays page

POLICY = """
[groups]
ops = ["alice"]

[[rules]]
src = ["group:ops"]
dst = ["*:22", "*:443"]

[[tests]]
src = "user:alice"
accept = ["node:laptop:22"]
deny = ["node:laptop:80"]
"""


class StreamingNode:
    """An enrolled node holding its map stream open in a thread of its own until :meth:`stop`."""

    def __init__(self, url: str, key: str, hostname: str, facts: Facts | None = None) -> None:
        self.url, self.key, self.hostname, self.facts = url, key, hostname, facts
        self.connected = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._loop.run_until_complete(self._main())
        except BaseException as exc:  # reported by stop() and by the test's wait
            self._error = exc

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        async with ControlClient(self.url, NodeKeys.generate()) as client:
            assert isinstance(await client.register(self.hostname, auth_key=self.key), Enrollment)
            if self.facts is not None:  # its netcheck facts, as meshd's path report sends them
                await pathreport.send(client, (), self.facts)
            async with client.stream() as stream:
                await stream.next_map(within=10)
                self.connected.set()
                await self._stop.wait()

    def stop(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(15)
        if self._error is not None:
            raise AssertionError(f"node {self.hostname} failed: {self._error!r}")


@pytest.fixture
def browser() -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must not download drivers or browsers
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new",
        "--no-sandbox",  # the tests run as root
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1360,900",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-default-apps",
        "--disable-domain-reliability",
        "--no-pings",
        # nothing but loopback: any other name fails to resolve (test traffic stays on this machine)
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    ):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(DRIVER)), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


def _stale(element: object) -> bool:
    from selenium.common.exceptions import StaleElementReferenceException, WebDriverException

    try:
        element.is_enabled()  # type: ignore[attr-defined]
    except StaleElementReferenceException:
        return True
    except WebDriverException as e:  # chromium may say this of an element whose page went (1 suite run)
        if "does not belong to the document" in str(e):
            return True
        raise
    return False


def test_log_in_approve_and_watch_a_node_go_offline(tmp_path: Path, browser: object) -> None:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.remote.webdriver import WebDriver

    assert isinstance(browser, WebDriver)
    driver = browser
    SHOTS.mkdir(parents=True, exist_ok=True)

    def shot(name: str) -> None:
        driver.save_screenshot(str(SHOTS / f"{name}.png"))

    def follow(by: str, what: str) -> None:
        """Click a link or button and wait for the next page: a click returns before the navigation it
        starts, so reading the page at once can read the old one (the old URL, the old rows)."""
        old = driver.find_element(By.TAG_NAME, "html")
        driver.find_element(by, what).click()
        eventually(lambda: _stale(old), within=10, what=f"the page after clicking {what}")

    def row_state(name: str) -> str | None:
        try:
            rows = driver.find_elements(By.ID, f"node-{name}")
            return rows[0].get_attribute("data-state") if rows else None
        except StaleElementReferenceException:  # the page reloaded itself between the two calls
            return None

    state, port = tmp_path / "state", free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(state, port)
    node: StreamingNode | None = None
    try:
        assert cli(state, "users", "create", "alice").returncode == 0
        key = cli(state, "keys", "create", "--user", "alice", "--reusable").stdout.split()[-1]
        made = cli(state, "tokens", "create", "--scope", "admin", "--description", "dashboard test")
        assert made.returncode == 0, made.stderr
        token = made.stdout.split()[-1]
        # both ends of the relayed pair behind endpoint-dependent NATs: the nodes page says why it is relayed
        node = StreamingNode(url, key, "laptop", Facts(True, "EDM", None))
        assert node.connected.wait(20), "the node's map stream did not open"
        policy = tmp_path / "policy.toml"
        policy.write_text(POLICY)
        assert cli(state, "policy", "set", str(policy)).returncode == 0

        async def wait_in_line() -> PendingApproval:
            async with ControlClient(url, NodeKeys.generate()) as c:
                result = await c.register("newbox")
                assert isinstance(result, PendingApproval)
                return result

        pending = asyncio.run(wait_in_line())

        async def phone_reports_its_path() -> None:  # issue 18: a node's path report on the nodes page
            listed = json.loads(cli(state, "nodes", "list", "--json").stdout)
            laptop_id = next(int(n["id"]) for n in listed if n["name"] == "laptop")
            async with ControlClient(url, NodeKeys.generate()) as c:
                assert isinstance(await c.register("phone", auth_key=key), Enrollment)
                entry = PathEntry(laptop_id, "relay", "tcp", 41.0)
                assert await pathreport.send(c, (entry,), Facts(True, "EDM", None)) == 1

        asyncio.run(phone_reports_its_path())

        async def relay_through_the_embedded_region() -> None:  # real traffic for the relays page
            async with (
                ControlClient(url, NodeKeys.generate()) as a,
                ControlClient(url, NodeKeys.generate()) as b,
            ):
                for c, name in ((a, "tablet"), (b, "desktop")):
                    assert isinstance(await c.register(name, auth_key=key), Enrollment)
                got: asyncio.Queue[bytes] = asyncio.Queue()

                async def link(c: ControlClient, on: Callable[[bytes, bytes], None]) -> rlink.RelayLink:
                    ticket = (await c.relay_ticket(1)).ticket.encode()
                    sign = SigningKey(c.keys.node_private).sign
                    return await rlink.connect(
                        url,
                        c.keys.wg_public,
                        ticket,
                        sign=lambda m: sign(m).signature,
                        region_id=1,
                        home=True,
                        on_packet=on,
                    )

                la = await link(a, lambda s, p: None)
                lb = await link(b, lambda s, p: got.put_nowait(p))
                try:
                    for _ in range(RELAYED):
                        la.send_packet(b.keys.wg_public, b"r" * 1200)
                    for _ in range(RELAYED):
                        assert await asyncio.wait_for(got.get(), 5) == b"r" * 1200
                finally:
                    la.close()
                    lb.close()

        asyncio.run(relay_through_the_embedded_region())

        # log in: the dashboard sends an anonymous visitor to the log-in page
        driver.get(url + "/admin")
        assert driver.current_url.endswith("/admin/login")
        shot("login")
        driver.find_element(By.ID, "token").send_keys("meshtok-wrong")
        follow(By.ID, "login")
        assert "invalid token" in driver.find_element(By.ID, "error").text
        driver.find_element(By.ID, "token").send_keys(token)
        follow(By.ID, "login")
        assert driver.current_url.endswith("/admin/nodes")
        cookie = driver.get_cookie("meshadmin")
        assert cookie is not None and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        assert token not in cookie["value"]
        eventually(lambda: row_state("laptop") == "online", within=10, what="laptop shown online")
        path = driver.find_element(By.CSS_SELECTOR, '#node-phone .path[data-peer="laptop"]')
        assert path.get_attribute("data-path") == "relay" and path.text.startswith(
            "laptop: relay (tcp) 41 ms"
        )
        why = path.find_element(By.CLASS_NAME, "why").text
        assert why.startswith("(why: ") and "EDM" in why and "port" in why, why
        assert "no peers" in driver.find_element(By.ID, "node-laptop").text  # facts only, no peer yet
        shot("nodes")

        # approve the waiting machine, after a confirmation page
        follow(By.ID, "nav-pending")
        assert driver.find_elements(By.ID, f"pending-{pending.code}")
        shot("approvals")
        follow(By.CSS_SELECTOR, f"#pending-{pending.code} a.approve")
        assert "Approve newbox" in driver.find_element(By.TAG_NAME, "h1").text
        shot("approve-confirm")
        follow(By.ID, "confirm")
        assert "approved node newbox" in driver.find_element(By.ID, "notice").text
        assert not driver.find_elements(By.ID, f"pending-{pending.code}")

        # the node goes offline: the page (reloading itself every 2 s) shows it within a few seconds
        follow(By.ID, "nav-nodes")
        assert row_state("newbox") == "offline"  # approved, never connected
        assert "not reported" in driver.find_element(By.ID, "node-newbox").text
        node.stop()
        node = None
        went = time.monotonic()
        eventually(lambda: row_state("laptop") == "offline", within=8, what="laptop shown offline")
        print(f"node shown offline {time.monotonic() - went:.1f} s after its stream closed")
        shot("nodes-offline")

        follow(By.ID, "nav-relays")
        figures = {
            cls: driver.find_element(By.CSS_SELECTOR, f"#region-1 td.{cls}").get_attribute("data-value")
            for cls in ("tcp-packets", "tcp-bytes", "udp-allocations")
        }
        assert figures == {
            "tcp-packets": str(RELAYED),
            "tcp-bytes": str(RELAYED * 1200),
            "udp-allocations": "0",
        }
        shot("relays")

        follow(By.ID, "nav-policy")
        results = [
            r.get_attribute("class") for r in driver.find_elements(By.CSS_SELECTOR, "#policy-tests tbody tr")
        ]
        assert results == ["pass"], results
        shot("policy")

        follow(By.ID, "nav-audit")
        assert "Chain intact" in driver.find_element(By.ID, "verdict").text
        driver.find_element(By.NAME, "action").send_keys("node.approved")
        follow(By.ID, "filter")
        rows = driver.find_elements(By.CSS_SELECTOR, "#audit tbody tr")
        assert len(rows) == 1 and "token:1" in rows[0].text and "newbox" in rows[0].text
        driver.find_element(By.NAME, "action").clear()
        follow(By.ID, "filter")
        shot("audit")
        assert token not in driver.page_source

        # revoking the token ends the session at once
        assert cli(state, "tokens", "revoke", "1").returncode == 0
        driver.get(url + "/admin/nodes")
        assert driver.current_url.endswith("/admin/login")
    finally:
        if node is not None:
            with contextlib.suppress(AssertionError):
                node.stop()
        err = stop_server(proc)
    assert token not in err  # nor in the coordinator's log
