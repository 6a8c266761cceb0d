"""Who may talk to the service (one bearer token) and which files a request may name (only
those inside the service root, after every symlink is followed)."""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path, PurePosixPath
from typing import Optional

TOKEN_ENV = "QLORA_SERVICE_TOKEN"
TOKEN_FILE = "service_token"


class PathRejected(ValueError):
    """A client-supplied path that is absolute, climbs out with `..`, or resolves outside the root."""


def load_or_create_token(root: Path, echo=print) -> str:
    """The token from $QLORA_SERVICE_TOKEN, else ROOT/service_token (created 0600 at first start)."""
    from_env = os.environ.get(TOKEN_ENV, "").strip()
    if from_env:
        echo(f"token: from ${TOKEN_ENV}")
        return from_env
    path = root / TOKEN_FILE
    try:
        # O_EXCL + mode 0600 at creation: the token is never readable by others, not even briefly.
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise PermissionError(
                f"{path}: the token file is readable by others (mode {mode:o}); chmod 600 it"
            ) from None
        echo(f"token: in {path}")
        return path.read_text().strip()
    token = secrets.token_urlsafe(32)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(token + "\n")
    echo(f"token: created {path} (mode 600); send it as 'Authorization: Bearer <token>'")
    return token


def token_matches(header: Optional[str], token: str) -> bool:
    """Constant-time comparison: the time taken tells nothing about how much of a guess was right."""
    scheme, _, given = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        return False
    return hmac.compare_digest(given.strip().encode(), token.encode())


def inside_root(root: Path, relative: str, key: str) -> Path:
    """ROOT/relative with every symlink resolved, or PathRejected naming `key` and the path.

    The root itself is resolved too, so a root that is itself a symlink still works."""
    if not isinstance(relative, str) or not relative.strip():
        raise PathRejected(f"{key}: expected a path inside the service root")
    pure = PurePosixPath(relative)
    if pure.is_absolute() or relative.startswith("~"):
        raise PathRejected(f"{key}: {relative}: absolute paths are refused; give a path relative to the service root")
    if ".." in pure.parts:
        raise PathRejected(f"{key}: {relative}: '..' is refused; give a path inside the service root")
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(real_root, relative))
    if os.path.commonpath([real, real_root]) != real_root:
        raise PathRejected(f"{key}: {relative}: resolves outside the service root (a symlink leads out)")
    return Path(real)
