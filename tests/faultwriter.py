"""A writer for the crash test: self-verifying files, a journal of what is committed.

Each file is: 8-byte length, 32-byte sha256 of the payload, payload. A line
"session/name sha256hex" is appended (and fsynced) to the journal once the
file is visible to another open, i.e. committed.
"""

import hashlib
import os
import struct
import sys

mnt, journal = sys.argv[1], sys.argv[2]
sizes = [0, 1, 4103, 300_000, (2 << 20) + 3]
with open(journal, "a") as j:
    i = 0
    while True:
        session = f"s{i % 3}"
        name = f"f{i}"
        payload = os.urandom(sizes[i % len(sizes)])
        body = struct.pack("<Q", len(payload)) + hashlib.sha256(payload).digest() + payload
        path = os.path.join(mnt, session, name)
        try:
            os.makedirs(os.path.join(mnt, session), exist_ok=True)
            with open(path, "wb") as f:
                for off in range(0, len(body), 1 << 20):
                    f.write(body[off : off + (1 << 20)])
            with open(path, "rb") as f:  # returns once the commit has landed
                f.read(1)
        except OSError:
            sys.exit(0)  # the daemon is gone
        j.write(f"{session}/{name} {hashlib.sha256(body).hexdigest()}\n")
        j.flush()
        os.fsync(j.fileno())
        i += 1
