#!/usr/bin/env python3
"""Sends token-bucket EVALSHA calls to a Redis on 127.0.0.1, pipelined 100 at a time.

Usage: drive.py PORT LAYOUT CALLS BUCKETS [PREFIX]

LAYOUT is `spec` (lua/token_bucket.lua, KeyLayout::TwoKeys: two keys and four decimal
arguments) or `compact` (lua/token_bucket_compact.lua, one key and the packed argument that
CompactArgs in crates/infrastructure-redis/src/script.rs builds). Call i goes to bucket i % BUCKETS, on a rule that never
denies (max_tokens = refill_rate = 1e9 per minute, so buckets refill in 60 s and keys live 120 s).
Both use Redis TIME. Loads the script first.
"""
import hashlib
import os
import socket
import struct
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..")
SCRIPTS = {"spec": "lua/token_bucket.lua", "compact": "lua/token_bucket_compact.lua"}


def encode(args):
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, str):
            arg = arg.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(out)


def read_replies(stream, count):
    def one():
        line = stream.readline()
        kind = line[:1]
        if kind in (b"+", b":"):
            return
        if kind == b"-":
            raise RuntimeError(line.decode().strip())
        if kind == b"$":
            size = int(line[1:-2])
            if size >= 0:
                stream.read(size + 2)
            return
        if kind == b"*":
            for _ in range(int(line[1:-2])):
                one()
            return
        raise RuntimeError("unexpected reply %r" % line)

    for _ in range(count):
        one()


def main():
    port, layout, calls, buckets = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    prefix = sys.argv[5] if len(sys.argv) > 5 else "rl"
    with open(os.path.join(ROOT, SCRIPTS[layout])) as f:
        script = f.read()
    sha = hashlib.sha1(script.encode()).hexdigest()
    sock = socket.create_connection(("127.0.0.1", int(port)))
    stream = sock.makefile("rb")
    sock.sendall(encode(["SCRIPT", "LOAD", script]))
    read_replies(stream, 1)
    packed = struct.pack("<ddd", 1e9, 1e9, 1.0) + b"120"
    batch = []
    for i in range(calls):
        base = "%s:%d" % (prefix, i % buckets)
        if layout == "compact":
            batch.append(encode(["EVALSHA", sha, "1", base + ":tb", packed]))
        else:
            batch.append(encode(["EVALSHA", sha, "2", base + ":tokens", base + ":time",
                                 "1000000000", "1000000000", "1", ""]))
        if len(batch) == 100 or i == calls - 1:
            sock.sendall(b"".join(batch))
            read_replies(stream, len(batch))
            batch = []


if __name__ == "__main__":
    main()
