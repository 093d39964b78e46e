#!/usr/bin/env python3
# Python 3 port of the seeds' client2.py (UDP): prompt, send a datagram,
# print the reply, and say goodbye with an empty datagram. Host and port from
# the command line; a timeout so that a lost reply fails instead of hanging.
import socket, sys

HOST, PORT = sys.argv[1], int(sys.argv[2])
family = socket.AF_INET6 if ':' in HOST else socket.AF_INET
cli = socket.socket(family, socket.SOCK_DGRAM)
cli.settimeout(5)
cli.connect((HOST, PORT))

while True:
    cmd = input("Input: ")
    if len(cmd) == 0:
        break
    cli.send(cmd.encode())
    ans = cli.recv(1024)
    print("Output: %s" % ans.decode(), flush=True)

# let the server know we are gone
cli.send(b"")
cli.close()
