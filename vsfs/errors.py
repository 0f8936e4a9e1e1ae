"""The one exception family of vsfs.

Each error carries the errno that the table of docs/reference.md, "Errors" (the
user's reference, which follows the contract) gives it. Only the FUSE adapter turns
these into ``FUSEError``; everything below it raises these and nothing else on
purpose.
"""

from __future__ import annotations

import errno


class VsfsError(Exception):
    """A refused or failed action, with the errno a shell user expects."""

    errno: int = errno.EIO

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Invalid(VsfsError):
    errno = errno.EINVAL


class Exists(VsfsError):
    errno = errno.EEXIST


class NotFound(VsfsError):
    errno = errno.ENOENT


class Busy(VsfsError):
    errno = errno.EBUSY


class NotEmpty(VsfsError):
    errno = errno.ENOTEMPTY


class NoSpace(VsfsError):
    errno = errno.ENOSPC


class Unsupported(VsfsError):
    errno = errno.EOPNOTSUPP


class Denied(VsfsError):
    errno = errno.EACCES


class Canceled(VsfsError):
    """The long operation a write started was cancelled (MNT/jobs/<id>/ctl)."""

    errno = errno.ECANCELED


class CrossDevice(VsfsError):
    errno = errno.EXDEV


class BackendFailed(VsfsError):
    """A command or system call of the backend failed; the message says why.

    ``returncode`` and ``stderr`` are the failed command's, when one failed,
    for backends that tell causes apart by them.
    """

    errno = errno.EIO

    def __init__(self, message: str, returncode: int | None = None, stderr: str = "") -> None:
        super().__init__(message)
        self.returncode = returncode
        self.stderr = stderr


class CommandNoSpace(BackendFailed):
    """A command failed for want of space: ENOSPC, and still a failed command."""

    errno = errno.ENOSPC


def os_failure(e: OSError, what: str) -> VsfsError:
    """A failed system call as the contract's error: EACCES/EPERM stay "permission
    denied" (the caller may not do this), ENOSPC/EDQUOT "no space", ETXTBSY/EBUSY
    "in use" (a program running from the file), the rest EIO with the call's message."""
    message = f"{what}: {e.strerror or e}"
    if e.errno in (errno.EACCES, errno.EPERM):
        return Denied(message)
    if e.errno in (errno.ETXTBSY, errno.EBUSY):
        return Busy(message)
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return NoSpace(message)
    return BackendFailed(message)
