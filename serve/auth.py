"""Optional bearer-token auth for the serving API.

The token comes from an environment variable or a secret file named in the serve config
(never from a request). Only its SHA-256 digest is handed to the Ray Serve replicas, so the
token itself is not stored in Ray's deployment metadata; a request's token is hashed and
compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
from pathlib import Path

from omnidiff.config import ConfigError


def load_token(token_env: str, token_file: Path | None) -> str | None:
    """The configured token: ``$token_env`` if set and non-empty, else the first line of ``token_file``.

    Returns None when neither is configured (auth off). A named file that is missing, empty or
    readable by other users is an error, not a silent "auth off".
    """
    value = os.environ.get(token_env, "").strip()
    if value:
        return value
    if token_file is None:
        return None
    path = Path(token_file).expanduser()
    if not path.is_file():
        raise ConfigError(f"auth.token_file={str(path)!r}: no such file")
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"auth.token_file={str(path)!r}: readable by group/others (mode {oct(mode & 0o777)}); chmod 600 it")
    lines = path.read_text(encoding="utf-8").splitlines()
    token = lines[0].strip() if lines else ""
    if not token:
        raise ConfigError(f"auth.token_file={str(path)!r}: the file is empty")
    return token


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def bearer_ok(authorization: str | None, digest: str | None) -> bool:
    """True when auth is off (``digest`` None) or ``authorization`` is ``Bearer <token>`` with the right token."""
    if digest is None:
        return True
    if not authorization:
        return False
    scheme, _, presented = authorization.partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        return False
    presented_digest = token_digest(presented.strip())
    return hmac.compare_digest(presented_digest, digest)
