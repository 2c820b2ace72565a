#!/usr/bin/env python3
"""Full-map size per peer: the map a fresh node receives, as text and on the wire (issue 16).

Builds a coordinator MapState with N peers that look like real ones (real certificates from a signing
key, addresses from the default pool, an endpoint or two, online), encodes the full map for one node the
way the stream sends it and prints bytes per peer: the JSON text, and the WebSocket payload (the map
stream sends a large message as a zlib-compressed binary frame: meshd.proto.netmap.frame_server_message).

    .venv/bin/python benchmarks/map_size.py --nodes 1000 10000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nacl.public import PrivateKey
from nacl.signing import SigningKey

from coordinator.certs import SigningKeys, issue_node_cert
from coordinator.mapstate import MapState
from meshd.proto import netmap
from meshd.proto.encoding import b64encode
from meshd.proto.netmap import Peer, RelayRegion


def build(nodes: int) -> MapState:
    seed = bytes(range(32))
    keys = SigningKeys(seed, (bytes(SigningKey(seed).verify_key),))
    state = MapState("mesh.internal", (RelayRegion(1, "home", "https://coord.example:8443/relay", 3478),),
                     signing_seed=lambda: seed)  # fmt: skip
    now = time.time()
    for i in range(1, nodes + 1):
        ips = (f"100.64.{i >> 8}.{i & 255}/32", f"fd7a:115c:a1e0::{i:x}/128")
        wg = b64encode(bytes(PrivateKey.generate().public_key))
        node = b64encode(bytes(SigningKey.generate().verify_key))
        name = f"host-{i}"
        cert, _ = issue_node_cert(keys, serial=i, name=name, node_id=i, ips=ips, wg_public_key=wg,
                                  node_public_key=node, tags=(), now=now, lifetime=90 * 86400)  # fmt: skip
        endpoints = (f"198.51.{(i >> 8) & 255}.{i & 255}:41641", f"10.0.{(i >> 8) & 255}.{i & 255}:41641")
        state.put_peer(Peer(i, name, ips, wg, node, cert, endpoints, 1, True, ()))
    state.version = nodes
    return state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[1000, 10000])
    args = parser.parse_args()
    out: dict[str, object] = {}
    for n in args.nodes:
        state = build(n)
        t0 = time.perf_counter()
        text = state.full_map_message(1)
        t1 = time.perf_counter()
        wire = netmap.frame_server_message(text)
        t2 = time.perf_counter()
        peers = n - 1
        out[str(n)] = {
            "text_bytes_per_peer": round(len(text) / peers, 1),
            "wire_bytes_per_peer": round(len(wire) / peers, 1),
            "full_map_wire_bytes": len(wire),
            "build_ms": round((t1 - t0) * 1000, 1),
            "compress_ms": round((t2 - t1) * 1000, 1),
        }
        print(f"{n} nodes: {out[str(n)]}", flush=True)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
