"""Authenticated, encrypted sockets: ZeroMQ CURVE with one key pair per role of a job.

A job's key folder (``downpour keys DIR``, or ``RUN_DIR/keys`` made by ``downpour train``;
mode 0700, secret files 0600) holds ZeroMQ certificates for the roles ``coordinator``,
``server``, ``worker`` and ``client`` (``downpour status``). Every listener is a CURVE
server whose ZAP handler admits only the job's public keys and tags each message with the
sender's role; every channel authenticates the listener it connects to by its public key.
A peer without the job's keys cannot complete a handshake: its messages never arrive.

Nodes need only their own secret file and the public files; ``Security.load`` reads those.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from downpour.errors import ConfigError

log = logging.getLogger(__name__)

ROLES = ("coordinator", "server", "worker", "client")
ZAP_DOMAIN = "downpour"


def create_job_keys(folder: str) -> str:
    """Make a fresh key pair per role in ``folder`` (created 0700; secret files 0600)."""
    os.makedirs(folder, mode=0o700, exist_ok=True)
    os.chmod(folder, 0o700)
    for role in ROLES:
        public, secret = zmq.auth.create_certificates(folder, role)
        os.chmod(secret, 0o600)
        os.chmod(public, 0o644)
    return folder


@dataclass
class Security:
    """One node's CURVE material: its role's key pair and the job's public keys."""

    role: str
    public: bytes
    secret: bytes
    publics: dict[str, bytes]  # role -> public key (z85)
    refused: int = 0  # handshakes refused by this node's ZAP handler
    _auth: dict[int, ThreadAuthenticator] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def load(cls, folder: str, role: str) -> Security:
        if role not in ROLES:
            raise ConfigError(f"key role must be one of {', '.join(ROLES)}, got {role!r}")
        if not os.path.isdir(folder):
            raise ConfigError(f"no key folder {folder!r}: create one with `downpour keys {folder}`")
        secret_path = os.path.join(folder, f"{role}.key_secret")
        try:
            if os.stat(secret_path).st_mode & 0o077:
                raise ConfigError(f"{secret_path} can be read by others: chmod 600 it")
            public, secret = zmq.auth.load_certificate(secret_path)
            publics = {r: zmq.auth.load_certificate(os.path.join(folder, f"{r}.key"))[0] for r in ROLES}
        except (OSError, ValueError) as err:
            raise ConfigError(f"cannot read the job's keys in {folder}: {err}") from None
        if secret is None:
            raise ConfigError(f"{secret_path} holds no secret key")
        return cls(role, public, secret, publics)

    def __post_init__(self) -> None:
        # public key (z85, as the ZAP handler's User-Id and its callback see it) -> role
        self._roles = {key.decode(): role for role, key in self.publics.items()}

    def role_of(self, user_id: str | None) -> str | None:
        """The role of a peer from the User-Id the ZAP handler gave its messages (its public key)."""
        return self._roles.get(user_id) if user_id else None

    # -- sockets ------------------------------------------------------------------
    def serve(self, socket: zmq.Socket, ctx: zmq.Context) -> None:
        """Make ``socket`` (before bind) a CURVE server admitting only the job's keys."""
        self._authenticator(ctx)
        socket.curve_secretkey = self.secret
        socket.curve_publickey = self.public
        socket.curve_server = True
        socket.zap_domain = ZAP_DOMAIN.encode()

    def connect(self, socket: zmq.Socket, server_role: str) -> None:
        """Make ``socket`` (before connect) a CURVE client of a listener of ``server_role``."""
        socket.curve_secretkey = self.secret
        socket.curve_publickey = self.public
        socket.curve_serverkey = self.publics[server_role]

    def _authenticator(self, ctx: zmq.Context) -> ThreadAuthenticator:
        """One ZAP handler per context (ZeroMQ asks it for every handshake on that context)."""
        with self._lock:
            auth = self._auth.get(id(ctx))
            if auth is None:
                auth = ThreadAuthenticator(ctx, log=logging.getLogger("downpour.zap"))
                auth.start()
                auth.configure_curve_callback(ZAP_DOMAIN, credentials_provider=self)
                self._auth[id(ctx)] = auth
            return auth

    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP: admit a client whose public key is one of the job's."""
        ok = (key.decode() if isinstance(key, bytes) else key) in self._roles
        if not ok:
            self.refused += 1
            log.warning("%s: refused a connection with a key that is not this job's", self.role)
        return ok

    def close(self) -> None:
        for auth in self._auth.values():
            auth.stop()
        self._auth.clear()
