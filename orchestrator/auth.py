"""Identities on a shared cluster: per-user API keys issued by an admin, checked by the controller.

An admin runs ``lorafleet admin add-user NAME [--admin]``; the controller generates a random key,
stores only its SHA-256 digest in the job store (``users`` table) and returns the key once. A
client presents the key on every call (``LORAFLEET_API_KEY``, else the file named by
``LORAFLEET_API_KEY_FILE``, else ``~/.lorafleet/api_key``, which must not be readable by group or
others); the controller derives the caller's identity from it. A job's owner is that identity,
never a name the client declares. Only the owner or an admin may see a job's details, its logs
and its adapter, or cancel it; ``policy set``, ``down`` and user management are admin-only.

With no users registered the cluster runs in **single-user mode**: nobody presents a key, every
caller is trusted as an admin and a job's owner is the name the client declares. Whoever can reach
Ray (its token, when Ray token auth is on) is then the admin. The first ``add-user`` must create an
admin; from then on every call needs a key. See docs/admin.md, "Users and API keys".

Keys are 43 random URL-safe characters after ``lfk_`` (256 bits), so a plain SHA-256 digest is
enough: there is nothing to brute-force.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

KEY_PREFIX = "lfk_"
ENV_KEY = "LORAFLEET_API_KEY"
ENV_KEY_FILE = "LORAFLEET_API_KEY_FILE"


class AccessError(PermissionError):
    """The caller may not do this (no key, an unknown key, or another owner's job)."""


@dataclass(frozen=True)
class Identity:
    """Who is calling: ``name`` owns the jobs it submits; ``admin`` may act on every job.

    ``authenticated`` is False in single-user mode (no users registered: nobody is checked).
    """

    name: str
    admin: bool
    authenticated: bool


def new_api_key() -> str:
    """A fresh random API key (``lfk_`` + 256 random bits, URL-safe)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """The SHA-256 hex digest the store keeps instead of the key."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def default_key_file() -> Path:
    home = Path(os.environ.get("LORAFLEET_HOME", Path.home() / ".lorafleet"))
    return home / "api_key"


def write_secret(path: str | os.PathLike[str], secret: str) -> Path:
    """Write ``secret`` to ``path`` readable and writable by its owner only (mode 0600).

    The file is created with 0600 before anything is written into it (no window where another
    user could read it); an existing file is truncated and its mode reset to 0600.
    """
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, (secret + "\n").encode())
    finally:
        os.close(fd)
    return path


def read_secret(path: str | os.PathLike[str], *, what: str) -> str:
    """Read a secret file that only its owner may read.

    Raises:
        AccessError: the file is readable by group or others (names the ``chmod`` that fixes it),
            or empty, or unreadable.
    """
    path = Path(path).expanduser()
    try:
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise AccessError(f"{what}: {path} is readable by other users (mode {stat.S_IMODE(mode):o}); "
                              f"run `chmod 600 {path}`")  # fmt: skip
        value = path.read_text().strip()
    except OSError as err:
        raise AccessError(f"{what}: cannot read {path}: {err.strerror or err}") from None
    if not value:
        raise AccessError(f"{what}: {path} is empty")
    return value


def client_api_key(explicit: str | None = None) -> str | None:
    """The API key this client presents: ``explicit``, ``LORAFLEET_API_KEY``, the key file, or None.

    The key file is ``LORAFLEET_API_KEY_FILE`` if set (then it must exist), else
    ``~/.lorafleet/api_key`` if it exists. Raises ``AccessError`` for a file others can read.
    """
    if explicit:
        return explicit.strip()
    if os.environ.get(ENV_KEY):
        return os.environ[ENV_KEY].strip()
    if os.environ.get(ENV_KEY_FILE):
        return read_secret(os.environ[ENV_KEY_FILE], what=ENV_KEY_FILE)
    path = default_key_file()
    return read_secret(path, what="API key file") if path.exists() else None
