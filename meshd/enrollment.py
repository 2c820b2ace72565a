"""Who this node is and which coordinator it talks to: the saved state checked against ``--coordinator``,
enrollment when the node has none, and a key rotation that was cut short settled before WireGuard comes
up. The daemon's first step (meshd.daemon); the credentials' life after it is meshd.credentials."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from meshd.control import ControlClient
from meshd.credentials import CredentialError, Credentials, default_hostname
from meshd.options import DaemonError, Options, coordinator_urls
from meshd.state import StateDir, StateError

log = logging.getLogger("meshd")

PENDING_KEY_WAIT = 5.0  #: at start, how long to ask the coordinator about an interrupted key rotation


def open_credentials(opts: Options, store: StateDir, clock: Callable[[], float]) -> Credentials:
    """The node's state and a client for its coordinator(s); DaemonError when they do not fit together.

    The caller holds the state dir's lock (one daemon per state dir)."""
    try:
        state = store.load_or_create()
    except StateError as e:
        raise DaemonError(str(e)) from None
    saved = state.coordinator_url
    # several URLs, comma-separated: replicas of one coordinator, failed over between (issue 16)
    urls = coordinator_urls(opts.coordinator or saved or "")
    if not urls:
        raise DaemonError("no coordinator: give --coordinator URL (e.g. http://coord.example:8080)")
    for url in urls:
        if not url.startswith(("http://", "https://")):
            raise DaemonError(f"coordinator URL {url!r} must start with http:// or https://")
    if saved and state.enrolled and not set(coordinator_urls(saved)) & set(urls):
        raise DaemonError(
            f"this node is enrolled with {saved}, not {','.join(urls)}; "
            f"use --state-dir for another mesh or move {store.state_file} away to re-enroll"
        )
    node_id = state.enrollment.node_id if state.enrollment else None
    client = ControlClient(urls[0], state.keys, node_id, fallbacks=urls[1:])
    return Credentials(store, state, client, clock=clock)


async def enroll_if_needed(creds: Credentials, opts: Options) -> None:
    """Enroll (waiting up to ``--approval-wait`` for an admin) unless enrolled; settle a pending key."""
    if creds.state.enrollment is None:
        hostname = opts.hostname or default_hostname()
        try:
            urls = ",".join(creds.client.urls)  # all of them are saved: the next start fails over too
            await creds.enroll(urls, hostname, opts.auth_key, opts.approval_wait)
        except CredentialError as e:
            raise DaemonError(str(e)) from None
    if creds.state.pending_wg_private is not None:  # a rotation was cut short: settle it first
        try:
            async with asyncio.timeout(PENDING_KEY_WAIT):
                await creds.recover_pending_key()
        except (CredentialError, TimeoutError) as e:
            log.warning("%s; the first map will settle it", e or "no answer about the pending key")


async def enroll_alongside(creds: Credentials, opts: Options, alongside: asyncio.Task[None]) -> None:
    """:func:`enroll_if_needed` while `alongside` (the interface coming up) runs on. When enrollment fails,
    `alongside` is cancelled and enrollment's error is the one raised, as when the two ran one after the
    other; `alongside`'s own outcome is left to the caller to await."""
    try:
        await enroll_if_needed(creds, opts)
    except BaseException:
        # cancel() also marks an error it already ended with as seen (no "never retrieved" in the log):
        # enrollment's error is the news
        alongside.cancel()
        await asyncio.wait({alongside})
        raise
