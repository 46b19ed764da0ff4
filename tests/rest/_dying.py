"""Worker targets for tests of lossd.bodyparse: imported by the spawned JSON worker, so it stays tiny."""

import os


def die_on_boom(data: bytes, kind: str):
    """Dies (as an out-of-memory kill would) on a body that says boom; parses anything else."""
    if b"boom" in bytes(data):
        os._exit(137)
    from lossd.bodyparse import parse

    return parse(data, kind)
