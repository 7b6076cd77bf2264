"""API keys: stored as SHA-256 hashes with scopes and a name, one per line, in BNLAB_API_KEYS_FILE.

    <sha256 hex of the key> <comma-separated scopes> <name>

Only hashes are stored; a presented key is hashed and compared with every stored hash in constant
time. `bnlab keys create` appends a line and prints the key once.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

Scope = Literal["read", "train", "admin"]
SCOPES: frozenset[str] = frozenset(get_args(Scope))
KEY_PREFIX = "bnlab_"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
HASH_PATTERN = re.compile(r"^[0-9a-f]{64}$")


class KeyFileError(ValueError):
    """The keys file is malformed; the message names the line."""


@dataclass(frozen=True)
class Principal:
    """Who is calling: a key's name and scopes. `admin` implies every scope."""

    name: str
    scopes: frozenset[str]

    def allows(self, scope: str) -> bool:
        return scope in self.scopes or "admin" in self.scopes


# Without a keys file the server only listens on loopback (settings refuse anything else), where
# every local caller is trusted with every scope.
LOCAL = Principal(name="local", scopes=frozenset(SCOPES))


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def parse_scopes(text: str) -> frozenset[str]:
    scopes = frozenset(part.strip() for part in text.split(",") if part.strip())
    unknown = scopes - SCOPES
    if not scopes or unknown:
        raise KeyFileError(f"scopes must be a comma-separated subset of {sorted(SCOPES)}; got {text!r}")
    return scopes


def parse_keys(text: str) -> dict[str, Principal]:
    keys: dict[str, Principal] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 3 or not HASH_PATTERN.match(parts[0]) or not NAME_PATTERN.match(parts[2]):
            raise KeyFileError(f"line {number}: expected '<sha256 hex> <scopes> <name>'")
        keys[parts[0]] = Principal(name=parts[2], scopes=parse_scopes(parts[1]))
    return keys


class KeyStore:
    """The keys file, re-read when it changes (so `bnlab keys create` needs no restart)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._stamp: tuple[int, int] | None = None
        self._keys: dict[str, Principal] = {}

    def _current(self) -> dict[str, Principal]:
        stat = self._path.stat()
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp != self._stamp:
            self._keys, self._stamp = parse_keys(self._path.read_text()), stamp
        return self._keys

    def authenticate(self, presented: str) -> Principal | None:
        digest = hash_key(presented)
        found: Principal | None = None
        for stored, principal in self._current().items():
            # Every stored hash is compared, whether or not one already matched: constant time.
            if hmac.compare_digest(stored, digest):
                found = principal
        return found


def create_key(path: Path, *, scopes: str, name: str) -> str:
    """Append a new key to the file (created 0600 if missing) and return the key itself."""
    if not NAME_PATTERN.match(name):
        raise KeyFileError(f"name must match {NAME_PATTERN.pattern}")
    parsed = parse_scopes(scopes)
    existing = parse_keys(path.read_text()) if path.exists() else {}
    if any(p.name == name for p in existing.values()):
        raise KeyFileError(f"a key named {name!r} already exists")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as handle:
        handle.write(f"{hash_key(key)} {','.join(sorted(parsed))} {name}\n")
    return key
