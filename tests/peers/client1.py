#!/usr/bin/env python3
# Python 3 port of the seeds' client1.py (TCP): prompt, send, print one
# recv(1024). Host and port from the command line.
import socket, sys

HOST, PORT = sys.argv[1], int(sys.argv[2])
family = socket.AF_INET6 if ':' in HOST else socket.AF_INET
cli = socket.socket(family, socket.SOCK_STREAM)
cli.connect((HOST, PORT))

while True:
    cmd = input("Input: ")
    if len(cmd) == 0:
        break
    cli.send(cmd.encode())
    ans = cli.recv(1024)
    print("Output: %s" % ans.decode(), flush=True)

cli.close()
