#!/usr/bin/env python3
# The reference for upcase's --utf8 mode: Python 3's str.upper().
#   unicode_upper.py version   -> the Unicode version of this Python
#   unicode_upper.py assigned  -> ranges "first last" (decimal) of the code
#                                 points this Python's Unicode assigns
#   unicode_upper.py upper     -> stdin: records (4-byte big-endian length,
#                                 bytes); stdout: the same framing, each record
#                                 decoded as UTF-8 (invalid bytes kept via
#                                 surrogateescape), uppercased, encoded back
import struct, sys, unicodedata

mode = sys.argv[1]
if mode == 'version':
    print(unicodedata.unidata_version)
elif mode == 'assigned':
    out, start = [], None
    for cp in range(0x110000):
        ok = unicodedata.category(chr(cp)) not in ('Cn', 'Cs')
        if ok and start is None:
            start = cp
        if not ok and start is not None:
            out.append('%d %d' % (start, cp - 1))
            start = None
    if start is not None:
        out.append('%d %d' % (start, 0x10FFFF))
    print('\n'.join(out))
elif mode == 'upper':
    data = sys.stdin.buffer.read()
    pos, res = 0, []
    while pos < len(data):
        (n,) = struct.unpack('>I', data[pos:pos + 4])
        rec = data[pos + 4:pos + 4 + n]
        pos += 4 + n
        up = rec.decode('utf-8', 'surrogateescape').upper().encode('utf-8', 'surrogateescape')
        res.append(struct.pack('>I', len(up)) + up)
    sys.stdout.buffer.write(b''.join(res))
else:
    sys.exit('usage: unicode_upper.py version|assigned|upper')
