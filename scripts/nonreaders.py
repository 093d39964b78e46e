# N clients that each try to write 10 MB and never read (non-blocking, rounds
# until no socket takes more), then hold them; prints progress.
import socket, sys, time, resource, select
resource.setrlimit(resource.RLIMIT_NOFILE, (20000, 20000))
port, n = int(sys.argv[1]), int(sys.argv[2])
socks, sent = [], []
for i in range(n):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096); s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096); s.setblocking(False)
    try: s.connect(('127.0.0.1', port))
    except BlockingIOError: pass
    socks.append(s); sent.append(0)
    if i % 500 == 499: time.sleep(0.05)
chunk = b'x' * 65536
t0 = time.time()
for rnd in range(60):
    moved = 0
    for i, s in enumerate(socks):
        while sent[i] < 10_000_000:
            try: k = s.send(chunk)
            except (BlockingIOError, InterruptedError): break
            except OSError: sent[i] = 10**9; break
            sent[i] += k; moved += k
    if moved == 0 and rnd > 3: break
    time.sleep(0.2)
print('written %.1f MB in %.0f s; holding' % (sum(min(x,10_000_000) for x in sent)/1e6, time.time()-t0), flush=True)
time.sleep(float(sys.argv[3]) if len(sys.argv) > 3 else 60)
