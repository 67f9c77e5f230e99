#!/usr/bin/env python3
"""Writes a routing map of N nodes (and one service on two of them) and a node config
naming it, for bench/scale.sh: distinct ids, keys, endpoints (198.18.0.0/15) and mesh
addresses (fd00:f1::/64), as an operator's generated map would have them.

usage: scale_map.py N DIR  ->  DIR/routing-N.toml, DIR/node-N.toml
"""
import base64
import hashlib
import sys


def main() -> None:
    n, out = int(sys.argv[1]), sys.argv[2]
    lines = []
    for i in range(n):
        key = base64.b64encode(hashlib.sha256(b"node %d" % i).digest()).decode()
        hi, lo = divmod(i, 250)
        lines.append(
            f'[[node]]\nid = "node-{i}"\nregion = "r{i % 16}"\npublic_key = "{key}"\n'
            f'endpoint = "198.{18 + hi // 256}.{hi % 256}.{lo + 1}:51820"\n'
            f'mesh_address = "fd00:f1::{i + 1:x}"\n'
        )
    lines.append(
        '[[service]]\nid = 1\nname = "echo"\nanycast = ["198.18.100.1"]\nports = [7]\n'
        '  [[service.worker]]\n  node = "node-1"\n  target = ["198.19.1.2:7"]\n'
        '  [[service.worker]]\n  node = "node-2"\n  target = ["198.19.2.2:7"]\n'
    )
    with open(f"{out}/routing-{n}.toml", "w") as f:
        f.write("\n".join(lines))
    with open(f"{out}/node-{n}.toml", "w") as f:
        f.write(
            f'node_id = "node-1"\nregion = "r1"\nmesh_address = "fd00:f1::2"\n'
            f'key_dir = "{out}/keys"\n[xdp]\ninterface = "eth0"\n'
            f'[source]\nfile = "{out}/routing-{n}.toml"\n'
        )


if __name__ == "__main__":
    main()
