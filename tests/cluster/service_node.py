"""A bare ClusterService in its own process, for tests that kill -9 a node.

It serves forwarded requests with a tiny echo handler and writes its status and
node list to --status-file (atomically, every 100 ms) so the test can watch it
from outside without any HTTP.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

from ollama_distributed.cluster import ClusterService


async def echo(request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    for i in range(int(request.get("n", 3))):
        yield {"i": i, "node": os.environ.get("NODE_ID", "")}
        await asyncio.sleep(float(request.get("delay", 0)))


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--id", required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--join", action="append", default=[])
    p.add_argument("--token")
    p.add_argument("--status-file", required=True)
    a = p.parse_args()
    os.environ["NODE_ID"] = a.id
    svc = ClusterService(node_id=a.id, data_dir=pathlib.Path(a.data_dir), host="127.0.0.1", port=a.port,
                         join=a.join, token=a.token, api_address=f"http://127.0.0.1/{a.id}")
    svc.set_inbound_handler(echo)
    await svc.start()
    print("READY", svc.join_token(), flush=True)
    out = pathlib.Path(a.status_file)
    tmp = out.with_suffix(".tmp")
    while True:
        svc.publish_advert({"models": ["m"], "in_flight": 0, "t": time.time()})
        tmp.write_text(json.dumps({"t": time.time(), "status": svc.status(), "nodes": svc.nodes()}))
        os.replace(tmp, out)
        await asyncio.sleep(0.1)


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
