"""A gateway process for the cluster tests: ``python _gateway_worker.py``.

Configured from ``DOTMAC_WEBSOCKETS__*`` variables like any deployment (the tests set the Redis
backend, the prefix, the JWT secret...). Clients may publish anywhere (the authorizer allows it),
so a test makes this process publish by sending a ``publish`` frame to it. Prints ``PORT <n>``
once listening; stops on SIGTERM.
"""

from __future__ import annotations

import asyncio
import signal
import sys

from dotmac.communications.config import CommunicationsConfig
from dotmac.communications.websockets import Identity, WebSocketGateway


async def _allow(identity: Identity, action: str, channel: str) -> bool:
    return True


async def main() -> None:
    config = CommunicationsConfig()
    gateway = WebSocketGateway.from_config(config.websockets, authorizer=_allow)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with gateway.serve("127.0.0.1", 0):
        sys.stdout.write(f"PORT {gateway.port}\n")
        sys.stdout.flush()
        await stop.wait()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
