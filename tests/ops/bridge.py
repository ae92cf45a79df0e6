"""A TCP-to-Unix-socket bridge for tests: HTTP clients that speak only TCP (schemathesis)
reach the daemon's socket through it. Each TCP connection gets its own connection to the
socket; bytes are copied both ways until either side closes. The daemon sees the bridge's
user as the caller (SO_PEERCRED).

    python3 tests/ops/bridge.py SOCKET PORT_FILE

Listens on 127.0.0.1 on a port the kernel picks, writes it to PORT_FILE, and runs until
killed."""

import asyncio
import sys


async def pipe(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        try:
            writer.write_eof()
        except (OSError, RuntimeError):
            writer.close()


async def serve(socket_path, port_file):
    async def handle(tcp_reader, tcp_writer):
        try:
            unix_reader, unix_writer = await asyncio.open_unix_connection(socket_path)
        except OSError:
            tcp_writer.close()
            return
        await asyncio.gather(pipe(tcp_reader, unix_writer), pipe(unix_reader, tcp_writer))
        tcp_writer.close()
        unix_writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    with open(port_file + ".tmp", "w") as f:
        f.write(f"{port}\n")
    import os

    os.replace(port_file + ".tmp", port_file)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1], sys.argv[2]))
