#!/usr/bin/env python3
# Port of the seeds' tcp_sixteen.py to Python 3 (Foundations of Python
# Network Programming, Listing 3-1): a TCP client and server that exchange
# fixed-length messages of 16 bytes, reading them whole with recvall().
# Usage: tcp_sixteen.py server HOST PORT | tcp_sixteen.py client HOST PORT

import socket, sys

def recvall(sock, length):
    data = b''
    while len(data) < length:
        more = sock.recv(length - len(data))
        if not more:
            raise EOFError('was expecting %d bytes but only received'
                           ' %d bytes before the socket closed'
                           % (length, len(data)))
        data += more
    return data

def server(interface, port):
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((interface, port))
    sock.listen(1)
    print('Listening at', sock.getsockname(), flush=True)
    while True:
        sc, sockname = sock.accept()
        print('We have accepted a connection from', sockname, flush=True)
        message = recvall(sc, 16)
        print('  Incoming sixteen-octet message:', repr(message), flush=True)
        sc.sendall(b'Farewell, client')
        sc.close()
        print('  Reply sent, socket closed', flush=True)

def client(host, port):
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.connect((host, port))
    print('Client has been assigned socket name', sock.getsockname())
    sock.sendall(b'Hi there, server')
    reply = recvall(sock, 16)
    print('The server said', repr(reply))
    sock.close()

if __name__ == '__main__':
    role, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    {'server': server, 'client': client}[role](host, port)
