"""Authenticated, encrypted sockets: ZeroMQ CURVE with one key pair per role of a job.

A job's key folder (``downpour keys DIR``, or ``RUN_DIR/keys`` made by ``downpour train``;
mode 0700, secret files 0600) holds ZeroMQ certificates for the roles ``coordinator``,
``server``, ``worker`` and ``client`` (``downpour status``). Every listener is a CURVE
server whose ZAP handler admits only the job's public keys and tags each message with the
sender's key; every channel authenticates the listener it connects to by its public key.
A peer without the job's keys cannot complete a handshake: its messages never arrive.

Workers share the ``worker`` key, unless the folder was made with one key per worker
(``downpour keys DIR --workers N``: ``worker-0`` .. ``worker-<N-1>``, and no shared one).
Such a key is bound to its worker rank: the coordinator admits its holder only as the worker
of that rank and takes requests for no other node from it, and servers take its requests
only under that worker's name (see ``rank_of``).

Nodes need only their own secret file and the public files; ``Security.load`` reads those.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from dataclasses import dataclass, field

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from downpour.errors import ConfigError

log = logging.getLogger(__name__)

ROLES = ("coordinator", "server", "worker", "client")
ZAP_DOMAIN = "downpour"
MAX_WORKER_KEYS = 4096
_WORKER_KEY = re.compile(r"worker-(0|[1-9][0-9]{0,3})")  # a key bound to one worker rank


def create_job_keys(folder: str, workers: int = 0) -> str:
    """Make fresh key pairs in ``folder`` (created 0700; secret files 0600): one per role, and
    with ``workers`` > 0 one per worker rank (``worker-0`` .. ``worker-<workers-1>``) in place of
    the shared ``worker`` key."""
    if type(workers) is not int or not 0 <= workers <= MAX_WORKER_KEYS:
        raise ConfigError(f"workers must be an integer in [0, {MAX_WORKER_KEYS}], got {workers!r}")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    os.chmod(folder, 0o700)
    names = [r for r in ROLES if r != "worker" or not workers] + [f"worker-{i}" for i in range(workers)]
    for name in names:
        public, secret = zmq.auth.create_certificates(folder, name)
        os.chmod(secret, 0o600)
        os.chmod(public, 0o644)
    return folder


def bound_name(rank: int, node: str) -> bool:
    """Whether the holder of worker ``rank``'s own key may act as node ``node``: the worker of that
    rank (``worker-R``, or ``worker-R.G`` when it replaced a worker of that rank)."""
    return node == f"worker-{rank}" or node.startswith(f"worker-{rank}.")


def _worker_keys(folder: str, suffix: str) -> list[str]:
    """Names of the per-worker keys in ``folder`` with files ending in ``suffix``, by rank."""
    found = [f[: -len(suffix)] for f in os.listdir(folder) if f.endswith(suffix)]
    return sorted((n for n in found if _WORKER_KEY.fullmatch(n)), key=lambda n: int(n[7:]))


def _own_key(folder: str, role: str, rank: int | None) -> str:
    """The name of the key a node of ``role`` uses: its role's, or a worker's own key."""
    if role != "worker" or os.path.exists(os.path.join(folder, "worker.key_secret")):
        return role
    own = _worker_keys(folder, ".key_secret")
    if not own and not _worker_keys(folder, ".key"):  # a shared-key job: its one worker key is missing here
        raise ConfigError(f"no worker key in {folder}: copy the job's worker.key_secret there "
                          "(its keys are shared by every worker: `downpour keys` made no worker-N keys)")
    if rank is not None:
        if f"worker-{rank}" not in own:
            raise ConfigError(f"no key for worker rank {rank} in {folder} (it holds "
                              f"{', '.join(own) or 'no worker key'}): give this worker worker-{rank}.key_secret")
        return f"worker-{rank}"
    if len(own) != 1:
        raise ConfigError(f"{folder} holds {'no worker key' if not own else 'the keys of several workers (' + ', '.join(own) + ')'}: "
                          "give each worker's machine only its own worker-N.key_secret, or start it with --rank N")
    return own[0]


@dataclass
class Security:
    """One node's CURVE material: its own key pair and the job's public keys."""

    role: str
    public: bytes
    secret: bytes
    publics: dict[str, bytes]  # key name (a role, or worker-N) -> public key (z85)
    refused: int = 0  # handshakes refused by this node's ZAP handler
    name: str = ""  # this node's key: its role's, or worker-N (default: the role)
    _auth: dict[int, ThreadAuthenticator] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def load(cls, folder: str, role: str, rank: int | None = None) -> Security:
        """The keys of a node of ``role`` from ``folder``. A worker whose folder holds per-worker
        keys uses its own: the one worker-N.key_secret there, or worker-``rank``'s."""
        if role not in ROLES:
            raise ConfigError(f"key role must be one of {', '.join(ROLES)}, got {role!r}")
        if not os.path.isdir(folder):
            raise ConfigError(f"no key folder {folder!r}: create one with `downpour keys {folder}`")
        try:
            name = _own_key(folder, role, rank)
            secret_path = os.path.join(folder, f"{name}.key_secret")
            if os.stat(secret_path).st_mode & 0o077:
                raise ConfigError(f"{secret_path} can be read by others: chmod 600 it")
            public, secret = zmq.auth.load_certificate(secret_path)
            workers = _worker_keys(folder, ".key") or ["worker"]
            names = [r for r in ROLES if r != "worker"] + workers
            publics = {n: zmq.auth.load_certificate(os.path.join(folder, f"{n}.key"))[0] for n in names}
        except (OSError, ValueError) as err:
            raise ConfigError(f"cannot read the job's keys in {folder}: {err}") from None
        if secret is None:
            raise ConfigError(f"{secret_path} holds no secret key")
        return cls(role, public, secret, publics, name=name)

    def __post_init__(self) -> None:
        self.name = self.name or self.role
        # public key (z85, as the ZAP handler's User-Id and its callback see it) -> key name, role
        self._names = {key.decode(): name for name, key in self.publics.items()}
        self._roles = {k: ("worker" if _WORKER_KEY.fullmatch(n) else n) for k, n in self._names.items()}

    @property
    def rank(self) -> int | None:
        """The worker rank this node's own key is bound to (None: a role's key)."""
        return int(self.name[7:]) if _WORKER_KEY.fullmatch(self.name) else None

    def role_of(self, user_id: str | None) -> str | None:
        """The role of a peer from the User-Id the ZAP handler gave its messages (its public key)."""
        return self._roles.get(user_id) if user_id else None

    def rank_of(self, user_id: str | None) -> int | None:
        """The worker rank a peer's key is bound to (a per-worker key), else None (a role's key,
        shared by every node of the role, or no key)."""
        name = self._names.get(user_id) if user_id else None
        return int(name[7:]) if name and _WORKER_KEY.fullmatch(name) else None

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
