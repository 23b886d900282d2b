"""Binding a unix-domain socket that only its owner can connect to.

gRPC creates the socket file when the port is added, with the process umask's mode,
and the kernel accepts connections into the listen backlog from then on, before
`server.start()`: a chmod after add_port leaves a window in which another user can
connect, and that connection is served once the server starts (checked: a connect
before start succeeds). Changing the umask around add_port is process-wide, and so
would also apply to files the training job's other threads create meanwhile.

So the socket is bound inside a fresh private directory (mkdtemp: mode 0700, so no
other user can reach anything in it), chmod-ed to 0600 there, then hard-linked to
its final path, which link() never lets replace an existing file, and the temporary
name is removed. At its final path the socket is 0600 from its first moment.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import tempfile
from dataclasses import dataclass
from typing import Callable

# sun_path holds 108 bytes with its terminating NUL.
MAX_PATH_BYTES = 107
SOCKET_MODE = 0o600
UNIX_SCHEME = "unix:"


@dataclass(frozen=True)
class BoundSocket:
    """A socket file this process bound: its path and identity (for a safe removal)."""

    path: str
    device: int
    inode: int

    def remove(self) -> None:
        """Remove the socket file, unless something else has replaced it since."""
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == (self.device, self.inode):
                os.unlink(self.path)
        except OSError:
            pass


def _is_live(path: str) -> bool:
    """True if a process accepts connections on the socket at `path`."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
        return True
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError as exc:
        raise OSError(f"cannot listen on unix:{path}: an existing socket there cannot be "
                      f"checked ({exc.strerror}); remove it if no worker uses it") from None
    finally:
        probe.close()


def check_path(path: str) -> None:
    """Refuse a path lrctl must not bind: parent missing, too long, an existing file that
    is not a socket (never deleted), or a socket a live process listens on. A stale
    socket (nobody listening) is removed."""
    where = f"unix:{path}"
    if len(os.fsencode(path)) > MAX_PATH_BYTES:
        raise ValueError(f"cannot listen on {where}: a unix socket path has at most "
                         f"{MAX_PATH_BYTES} bytes; choose a shorter one")
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise ValueError(f"cannot listen on {where}: the directory {parent!r} does not exist")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ValueError(f"cannot listen on {where}: {path!r} exists and is not a socket "
                         "(lrctl never deletes it; choose another path or remove it yourself)")
    if _is_live(path):
        raise OSError(f"cannot listen on {where}: another process is listening on it "
                      "(is another worker running?)")
    os.unlink(path)  # stale: left by a worker that did not stop cleanly


def bind_private(path: str, add_port: Callable[[str], int]) -> BoundSocket:
    """Bind with `add_port` (given a gRPC address) so that `path` is a 0600 socket from
    its first moment (module docstring). Call check_path first."""
    where = f"unix:{path}"
    try:
        private = tempfile.mkdtemp(prefix=".lrctl", dir=os.path.dirname(path))
    except OSError as exc:
        raise OSError(f"cannot listen on {where}: cannot create it in {os.path.dirname(path)!r} "
                      f"({exc.strerror})") from None
    temporary = os.path.join(private, "s")
    try:
        if len(os.fsencode(temporary)) > MAX_PATH_BYTES:
            raise ValueError(f"cannot listen on {where}: the directory's path is too long to bind "
                             f"a socket in it (at most {MAX_PATH_BYTES - 16} bytes)")
        try:
            port = add_port(UNIX_SCHEME + temporary)
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {where}: {exc}") from None
        if port == 0:
            raise OSError(f"cannot listen on {where}")
        os.chmod(temporary, SOCKET_MODE)
        try:
            os.link(temporary, path)
        except OSError as exc:
            why = ("something was created there meanwhile" if exc.errno == errno.EEXIST
                   else exc.strerror)
            raise OSError(f"cannot listen on {where}: {why}") from None
        st = os.lstat(path)
        return BoundSocket(path, st.st_dev, st.st_ino)
    finally:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        os.rmdir(private)

