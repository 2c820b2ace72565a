"""meshd/startup.py: the daemon's process skips optional imports it never uses (issue 15)."""

from __future__ import annotations

import subprocess
import sys
import types

from meshd.startup import UNUSED, skip_unused_imports

#: in a fresh process: skip, then one real HTTP request through httpx/httpcore on asyncio (loopback)
CODE = """
import asyncio, sys
from meshd.startup import skip_unused_imports
skip_unused_imports()
import httpx

async def serve(reader, writer):
    await reader.readuntil(b"\\r\\n\\r\\n")
    writer.write(b"HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\nConnection: close\\r\\n\\r\\nok")
    await writer.drain()
    writer.close()

async def main():
    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
        r = await client.get("/")
    server.close()
    print(r.status_code, r.text, sys.modules.get("trio") is not None)

asyncio.run(main())
"""


def test_the_coordinator_client_works_without_importing_trio() -> None:
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["200", "ok", "False"]


def test_skipping_leaves_an_already_imported_module_alone() -> None:
    fake = types.ModuleType(UNUSED[0])
    saved = sys.modules.get(UNUSED[0])
    had = UNUSED[0] in sys.modules
    sys.modules[UNUSED[0]] = fake
    try:
        skip_unused_imports()
        assert sys.modules[UNUSED[0]] is fake
    finally:
        if had:
            sys.modules[UNUSED[0]] = saved  # type: ignore[assignment]
        else:
            del sys.modules[UNUSED[0]]
