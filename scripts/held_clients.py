#!/usr/bin/env python3
"""Clients that hold a server's memory, for scripts/bench-core-memory.sh.

    held_clients.py KIND HOST PORT N

KIND is one of:
  length   each sends the 4-byte header of an 8 MiB - 1 message and as
           much of it as the kernel takes, one byte short, never reading
  tls1     each sends one byte of a TLS ClientHello, then nothing
  tlsidle  each completes a TLS handshake and one message, then idles
Prints "ready N" once all N are in place, then holds them until stdin
closes. Bounded: 60 s to get ready, 20 passes of writes.
"""
import socket, ssl, sys, time

kind, host, port, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
deadline = time.time() + 60
conns = []
if kind == "length":
    size = (8 << 20) - 1
    header = (8 << 20).to_bytes(4, "big")
    chunk = b"x" * 65536
    left = []
    for _ in range(n):
        s = socket.create_connection((host, port))
        s.sendall(header)
        s.setblocking(False)
        conns.append(s)
        left.append(size - 1)
    for _ in range(20):
        moved = 0
        for i, s in enumerate(conns):
            while left[i] > 0 and time.time() < deadline:
                try:
                    k = s.send(chunk[: min(len(chunk), left[i])])
                except BlockingIOError:
                    break
                left[i] -= k
                moved += k
        if moved == 0:
            break
        time.sleep(0.2)
elif kind == "tls1":
    for _ in range(n):
        s = socket.create_connection((host, port))
        s.sendall(b"\x16")
        conns.append(s)
elif kind == "tlsidle":
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    for _ in range(n):
        s = ctx.wrap_socket(socket.create_connection((host, port)))
        s.sendall(b"hello")
        got = b""
        while len(got) < 5:
            got += s.recv(5 - len(got))
        assert got == b"HELLO", got
        conns.append(s)
else:
    sys.exit("unknown kind " + kind)
print("ready", len(conns), flush=True)
sys.stdin.read()
