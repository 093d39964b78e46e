#!/usr/bin/env python3
# A deliberately wrong uppercase server, for testing that upcase's clients
# notice. Usage: wrong_server.py HOST PORT MODE AT, with AT a byte number
# counted over the whole connection. MODE "wrong" sends byte AT back
# unchanged; "extra" adds a byte '!' before it; "truncate" closes the
# connection after AT bytes; "short" stops answering (but keeps reading)
# after AT bytes. Threaded; PORT 0 picks a free port, printed.
import socket, sys, threading

HOST, PORT, MODE, AT = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])

def serve(conn):
    n = 0
    with conn:
        while True:
            data = conn.recv(65536)
            if not data:
                conn.shutdown(socket.SHUT_WR)
                return
            out = bytearray(data.upper())
            if MODE == 'wrong' and n <= AT < n + len(data):
                out[AT - n] = data[AT - n]
            if MODE == 'extra' and n <= AT < n + len(data):
                out.insert(AT - n, ord('!'))
            if MODE == 'short':
                conn.sendall(bytes(out[:max(0, AT - n)]))
                n += len(data)
                continue
            if MODE == 'truncate' and n + len(data) > AT:
                conn.sendall(bytes(out[:max(0, AT - n)]))
                return
            conn.sendall(bytes(out))
            n += len(data)

srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((HOST, PORT))
srv.listen(64)
print('Listening at', srv.getsockname(), flush=True)
while True:
    conn, _ = srv.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
