"""A real WebSocket peer for tests/tls.rs (the `websockets` package):

    ws.py serve                      an echo server on 127.0.0.1; prints its port
    ws.py client URL CA NAME         connects over wss:// to URL (at 127.0.0.1),
                                     verifying NAME against CA; sends three
                                     messages and prints what came back
"""

import asyncio
import ssl
import sys
from urllib.parse import urlparse

from websockets.asyncio.client import connect
from websockets.asyncio.server import serve


async def echo(ws):
    async for message in ws:
        await ws.send(message)


async def run_server():
    async with serve(echo, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        print(port, flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


async def run_client(url, ca, name):
    ctx = ssl.create_default_context(cafile=ca)
    port = urlparse(url).port
    async with connect(url, ssl=ctx, server_hostname=name, host="127.0.0.1", port=port) as ws:
        got = []
        for text in ("one", "two", "three"):
            await ws.send(text)
            got.append(await asyncio.wait_for(ws.recv(), 5))
        print(" ".join(got), ws.transport.get_extra_info("ssl_object").version())


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        asyncio.run(run_server())
    else:
        asyncio.run(run_client(*sys.argv[2:5]))
