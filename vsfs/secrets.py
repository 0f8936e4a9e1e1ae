"""Credentials that pool XML refers to (``<auth><secret uuid|usage=…/></auth>``).

libvirt keeps them in its secret driver; vsfs reads the same files. A secret is
found in one of two places:

- ``<secret usage='/an/absolute/path'/>``: that file holds the password (one
  trailing newline is dropped);
- otherwise ``STATE/secrets/``, in libvirt's own layout (a copy of
  ``/etc/libvirt/secrets`` works): ``<uuid>.xml`` describes the secret and its
  usage, ``<uuid>.base64`` holds the value, base64-encoded. ``uuid=`` names the
  file directly; ``usage=`` is matched against each ``<usage>`` (its
  ``<target>`` for iscsi, its ``<name>`` for ceph).

Every file holding a value must be a regular file that only its owner (root
or the daemon's user) can read or write: mode 0600 or stricter. The value is
never logged or put into an error message.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
from pathlib import Path

from lxml import etree

from .errors import Denied, Invalid, NotFound
from .model import SourceAuth
from .xmlio import MAX_XML_BYTES, safe_parser

MAX_SECRET_BYTES = 64 << 10


def _read_private(path: Path) -> bytes:
    """The bytes of a file only its owner may read; refuses anything looser. Blocking."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound(f"secret file {path} does not exist") from None
    except OSError as e:
        raise Denied(f"secret file {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Invalid(f"secret file {path} is not a regular file")
        if st.st_mode & 0o077:
            raise Denied(f"secret file {path} is open to others (mode "
                         f"{stat.S_IMODE(st.st_mode):04o}); chmod 600 it")
        if st.st_uid not in (0, os.geteuid()):
            raise Denied(f"secret file {path} belongs to uid {st.st_uid}, not to root")
        data = os.read(fd, MAX_SECRET_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_SECRET_BYTES:
        raise Invalid(f"secret file {path} is larger than {MAX_SECRET_BYTES} bytes")
    return data


class SecretStore:
    """Looks secrets up for backends. Blocking: call it from a worker thread."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def ceph_key(self, auth: SourceAuth) -> str:
        """A Ceph key as Ceph prints it (base64): from a key file, a keyring (its
        ``key = …`` line), or a libvirt secret's ``.base64`` file, which holds exactly that."""
        if auth.secret_usage is not None and auth.secret_usage.startswith("/"):
            text = self.value(auth).strip()
            for line in text.splitlines():
                name, eq, value = line.partition("=")
                if eq and name.strip() == "key":
                    return value.strip()  # a keyring
            if "\n" in text or "[" in text:
                raise Invalid(f"{auth.secret_usage} holds no Ceph key")
            return text
        return base64.b64encode(self.raw(auth)).decode()

    def value(self, auth: SourceAuth) -> str:
        """The password ``auth`` refers to, as text."""
        try:
            return self.raw(auth).decode("utf-8")
        except UnicodeDecodeError:
            raise Invalid("the secret is not UTF-8 text") from None

    def raw(self, auth: SourceAuth) -> bytes:
        """The bytes of the secret ``auth`` refers to."""
        if auth.secret_usage is not None and auth.secret_usage.startswith("/"):
            data = _read_private(Path(auth.secret_usage))
            data = data.removesuffix(b"\n")
        else:
            uuid = auth.secret_uuid or self._uuid_of(auth)
            if "/" in uuid or uuid.startswith("."):
                raise Invalid(f"bad secret uuid {uuid!r}")
            encoded = _read_private(self.dir / f"{uuid}.base64")
            try:
                data = base64.b64decode(encoded.strip(), validate=True)
            except binascii.Error:
                raise Invalid(f"{self.dir / uuid}.base64 is not base64") from None
        if not data:
            raise Invalid("the secret is empty")
        return data

    def _uuid_of(self, auth: SourceAuth) -> str:
        """The UUID of the stored secret whose usage is ``auth.secret_usage``."""
        usage = auth.secret_usage
        # CHAP credentials are libvirt secrets of usage type iscsi.
        wanted = {"chap": "iscsi"}.get(auth.type, auth.type)
        for path in sorted(self.dir.glob("*.xml")) if self.dir.is_dir() else ():
            try:
                if path.stat().st_size > MAX_XML_BYTES:
                    continue
                root = etree.fromstring(path.read_bytes(), safe_parser())
            except (OSError, etree.XMLSyntaxError):
                continue
            el = root.find("usage")
            if el is None or el.get("type") != wanted:
                continue
            if usage in (el.findtext("target"), el.findtext("name")):
                uuid = root.findtext("uuid") or path.stem
                return uuid.strip()
        raise NotFound(f"no secret with usage {usage!r} in {self.dir} (a libvirt secret: "
                       "<uuid>.xml and <uuid>.base64)")
