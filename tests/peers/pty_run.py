#!/usr/bin/env python3
"""Runs a command in a pseudo-terminal of its own, as a shell in a terminal
would: the command is the terminal's foreground process group, so a ^C
written to the terminal reaches the whole group from the kernel, as
Ctrl-C does (si_code SI_KERNEL), not from kill(2).

Everything the command prints comes out on stdout, a line at a time. A line
on stdin is a key to press: "ctrl-c" (^C), "ctrl-backslash" (^\\), or
"hangup" (close the terminal: the kernel sends SIGHUP). When the command
ends, prints "EXIT <code>" (or "EXIT signal <n>") and exits.
"""
import os
import pty
import select
import sys

KEYS = {"ctrl-c": b"\x03", "ctrl-backslash": b"\x1c"}

pid, fd = pty.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])

buf = b""
stdin_open = True
master_open = True
while True:
    fds = ([fd] if master_open else []) + ([sys.stdin.fileno()] if stdin_open else [])
    ready, _, _ = select.select(fds, [], [], 0.2)
    if fd in ready:
        try:
            data = os.read(fd, 4096)
        except OSError:
            data = b""
        if not data:
            master_open = False
        buf += data
        *lines, buf = buf.split(b"\n")
        for line in lines:
            sys.stdout.write(line.decode(errors="replace").rstrip("\r") + "\n")
        sys.stdout.flush()
    if sys.stdin.fileno() in ready:
        cmd = sys.stdin.readline()
        if not cmd:
            stdin_open = False
        elif cmd.strip() == "hangup":
            os.close(fd)
            master_open = False
        elif cmd.strip() in KEYS:
            os.write(fd, KEYS[cmd.strip()])
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        if master_open:
            # What is left in the terminal.
            try:
                while True:
                    r, _, _ = select.select([fd], [], [], 0.1)
                    if not r:
                        break
                    data = os.read(fd, 4096)
                    if not data:
                        break
                    buf += data
            except OSError:
                pass
            for line in buf.split(b"\n"):
                if line:
                    sys.stdout.write(line.decode(errors="replace").rstrip("\r") + "\n")
        if os.WIFSIGNALED(status):
            print(f"EXIT signal {os.WTERMSIG(status)}", flush=True)
        else:
            print(f"EXIT {os.WEXITSTATUS(status)}", flush=True)
        sys.exit(0)
