"""TCP proxy that adds a fixed one-way delay, to make a local main PostgreSQL feel far away.

Each chunk is scheduled for delivery at arrival + delay, so the delay is pipelined:
latency grows by 2*delay per round trip but throughput is not capped (no serial
sleep per chunk).  Run as `python -m obs_pipeline.stack.latency_proxy --listen PORT
--target HOST:PORT --delay-ms N [--daemonize --pidfile FILE]`; stdlib only, and not
imported by the package (proxy_process.py launches it by module name), so `-m` runs it cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sys
from pathlib import Path

CHUNK = 65536
MAX_QUEUED_CHUNKS = 256  # per direction: bounds memory, still ~16 MB in flight


async def _forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    """Copy reader -> writer, each chunk (and EOF) delivered `delay` seconds after it arrived."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(MAX_QUEUED_CHUNKS)

    async def receive() -> None:
        data = b"x"
        while data:
            try:
                data = await reader.read(CHUNK)
            except OSError:
                data = b""
            await queue.put((loop.time() + delay, data))

    async def deliver() -> None:
        while True:
            due, data = await queue.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    receiver = asyncio.ensure_future(receive())
    try:
        await deliver()
    finally:
        receiver.cancel()


async def _handle(client_r, client_w, target: tuple[str, int], delay: float) -> None:
    try:
        upstream_r, upstream_w = await asyncio.open_connection(*target)
    except OSError:
        client_w.close()
        return
    tasks = [asyncio.ensure_future(_forward(client_r, upstream_w, delay)),
             asyncio.ensure_future(_forward(upstream_r, client_w, delay))]
    try:
        # both directions end normally on EOF; if one breaks, tear down the other too
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    except asyncio.CancelledError:
        pass  # proxy shutting down; re-raising only makes asyncio log a traceback per connection
    finally:
        for task in tasks:
            task.cancel()
            if task.done() and not task.cancelled():
                task.exception()  # a reset peer is normal: mark it handled, no log noise
        for w in (client_w, upstream_w):
            w.close()


async def _serve(sock: socket.socket, target: tuple[str, int], delay: float) -> None:
    connections: set[asyncio.Task] = set()

    async def handle(reader, writer) -> None:
        task = asyncio.current_task()
        connections.add(task)
        try:
            await _handle(reader, writer, target, delay)
        finally:
            connections.discard(task)

    server = await asyncio.start_server(handle, sock=sock)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    # Close the connections ourselves: from Python 3.12.1 the server's wait_closed() waits for
    # every one, and the replica's WAL stream never ends by itself (a stop became a SIGKILL).
    server.close()
    for task in list(connections):
        task.cancel()
    await asyncio.gather(*connections, return_exceptions=True)


def _exit_before_serving(signum, frame) -> None:  # noqa: ARG001
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--listen", required=True, help="PORT or HOST:PORT (host defaults to 127.0.0.1)")
    parser.add_argument("--target", required=True, help="HOST:PORT to forward to")
    parser.add_argument("--delay-ms", type=float, required=True, help="one-way delay added in each direction")
    parser.add_argument("--daemonize", action="store_true", help="fork into the background once listening")
    parser.add_argument("--pidfile", help="write a JSON pidfile here (removed on exit)")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    thost, _, tport = args.target.rpartition(":")
    target = (thost or "127.0.0.1", int(tport))

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host or "127.0.0.1", int(port)))
    except OSError as exc:
        print(f"latency_proxy: cannot listen on {args.listen}: {exc}", file=sys.stderr)
        return 1
    sock.listen(128)  # listening before the parent exits, so "started" means "connectable"

    if args.daemonize:
        if os.fork() > 0:
            os._exit(0)  # the launcher then waits for the child's pidfile
        os.setsid()
    pidfile = Path(args.pidfile) if args.pidfile else None
    # A stop before the event loop takes it (in _serve) exits through the `finally` below: killed
    # at once, the proxy left its pidfile behind (a `stack stop` right after `up`, a loaded host).
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_before_serving)
    try:
        if pidfile:
            info = {"pid": os.getpid(), "listen": args.listen, "target": args.target, "delay_ms": args.delay_ms}
            pidfile.write_text(json.dumps(info) + "\n")
        print(f"latency_proxy pid {os.getpid()}: {args.listen} -> {args.target}, +{args.delay_ms} ms each way",
              file=sys.stderr, flush=True)
        asyncio.run(_serve(sock, target, args.delay_ms / 1000.0))
    finally:
        if pidfile and pidfile.is_file() and json.loads(pidfile.read_text()).get("pid") == os.getpid():
            pidfile.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
