#!/usr/bin/env python3
# Python 3 port of the seeds' server2.py (UDP): uppercase each datagram and
# send it back; stop at the first empty datagram, as the seed does. Host and
# port from the command line (port 0: any free port, printed).
import socket, sys

HOST, PORT = sys.argv[1], int(sys.argv[2])
family = socket.AF_INET6 if ':' in HOST else socket.AF_INET
srv = socket.socket(family, socket.SOCK_DGRAM)
srv.bind((HOST, PORT))
print('Listening at', srv.getsockname(), flush=True)

while True:
    data, addr = srv.recvfrom(65535)
    if not data:
        break
    srv.sendto(data.upper(), addr)
srv.close()
