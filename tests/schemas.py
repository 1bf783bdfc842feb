"""The NATS micro (ADR-32) JSON schemas that `nats micro` validates replies with.

The project's shared design folder (beside the repo) holds the authoritative copy;
`tests/data/nats-micro-schemas` is a copy of the same files (from jsm.go) so the tests
also run from a clone without it.
"""

import json
from pathlib import Path

_SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "nats-micro-schemas"
_BUNDLED = Path(__file__).resolve().parent / "data" / "nats-micro-schemas"
SCHEMA_DIR = _SHARED if _SHARED.is_dir() else _BUNDLED


def schema(verb: str) -> dict:
    """The response schema for `ping`, `info` or `stats`."""
    return json.loads((SCHEMA_DIR / f"{verb}_response.json").read_text())
