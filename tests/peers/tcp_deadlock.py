#!/usr/bin/env python3
# Python 3 port of the seeds' tcp_deadlock.py (Foundations of Python Network
# Programming, listing 3-2), kept as a real peer for upcase's tests.
# Changes from the seed: Python 3, host and port from the command line (port 0
# for any free port), and output flushed so that a test can read it.
import socket, sys

def usage():
    print('usage: tcp_deadlock.py server HOST PORT | client HOST PORT BYTES', file=sys.stderr)
    sys.exit(2)

if len(sys.argv) < 4:
    usage()
HOST, PORT = sys.argv[2], int(sys.argv[3])
family = socket.AF_INET6 if ':' in HOST else socket.AF_INET
s = socket.socket(family, socket.SOCK_STREAM)

if sys.argv[1] == 'server' and len(sys.argv) == 4:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((HOST, PORT))
    s.listen(1)
    while True:
        print('Listening at', s.getsockname(), flush=True)
        sc, sockname = s.accept()
        print('Processing up to 1024 bytes at a time from', sockname, flush=True)
        n = 0
        while True:
            message = sc.recv(1024)
            if not message:
                break
            sc.sendall(message.upper())  # send it back uppercase
            n += len(message)
        print('%d bytes processed so far' % (n,), flush=True)
        sc.close()
        print('Completed processing', flush=True)

elif sys.argv[1] == 'client' and len(sys.argv) == 5 and sys.argv[4].isdigit():
    nbytes = (int(sys.argv[4]) + 15) // 16 * 16  # round up to // 16
    message = b'capitalize this!'  # 16-byte message to repeat over and over

    print('Sending', nbytes, 'bytes of data, in chunks of 16 bytes')
    s.connect((HOST, PORT))

    sent = 0
    while sent < nbytes:
        s.sendall(message)
        sent += len(message)
    print('%d bytes sent' % (sent,))
    s.shutdown(socket.SHUT_WR)

    print('Receiving all the data the server sends back')

    received = 0
    while True:
        data = s.recv(42)
        if not received:
            print('The first data received says', repr(data))
        received += len(data)
        if not data:
            break
    print('%d bytes received' % (received,))
    s.close()
else:
    usage()
