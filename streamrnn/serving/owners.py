"""Stream owners: which client identity may touch a stream, and open streams per identity.

Pure Python (no TensorFlow, no sockets); used by the worker's compute thread through its
:class:`~streamrnn.serving.sequencing.SequenceTable`.

A stream belongs to the client identity whose request created it (its first PUSH or
GENERATE at ``seq`` 0), its **owner**, kept as a string:

* with CURVE on, the client's CURVE public key (z85, the ZAP ``User-Id`` of its messages):
  ``"curve:<z85 key>"``;
* with a ``token`` field in the creating request, the token (only its SHA-256 is kept):
  ``"token:<hex digest>"``;
* both: ``"curve:<z85 key> token:<hex digest>"`` (both must match);
* neither: ``None``: anyone may touch the stream (the protocol's behaviour before owners).

Behind a router, the worker's CURVE peer is the router, not the client: the router vouches
for its client's key in the ``client_key`` field, which the worker believes only from the
routers it trusts (``--curve-routers``): :func:`vouched_user` says whose key a request
carries.

Every later request of the stream must present the same credentials (compared with
:func:`hmac.compare_digest`), else it is answered ERROR ``FORBIDDEN``.

Each created stream is also *charged* to an identity for the per-identity limit on open
streams (``--max-streams-per-identity``): its CURVE key, else its connection (the ZeroMQ
routing id, which a peer can change by reconnecting: without CURVE the limit is per
connection).

Example::

    caller = Caller(key=None, token="s3cret", peer=b"\\x00k\\x8bEg")
    caller.owner                       # "token:4d2a..." (the SHA-256 of "s3cret")
    permits(caller.owner, caller)      # True
    book = OwnerBook(limit=2)
    book.claim("a", caller)            # True: admitted to create stream "a"
    book.created("a")                  # the stream exists: "a" is caller's
    book.owner("a") == caller.owner    # True
"""

from __future__ import annotations

import hashlib
import hmac
from collections import Counter
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from streamrnn.errors import CheckpointError
from streamrnn.protocol import F_CLIENT_KEY, MAX_STR_BYTES

__all__ = ["Caller", "OwnerBook", "check_owner", "load_owners", "permits", "token_digest",
           "vouched_user"]

_CURVE = "curve:"
_TOKEN = "token:"


def token_digest(token: str) -> str:
    """The SHA-256 (hex) of a stream token: what an owner keeps instead of the token."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def vouched_user(sender: str | None, header: Mapping[str, Any],
                 trusted: Collection[str]) -> str | None:
    """The CURVE key (z85) a request is made with: ``sender``, its peer's own key (None
    without CURVE), unless that peer is a trusted router (``sender in trusted``): then the
    key the router vouches for in the header's ``client_key`` (None when it sent none: its
    client socket has no CURVE, so tokens and the connection decide, as without CURVE).

    Example::

        vouched_user("R" * 40, {"client_key": "A" * 40}, {"R" * 40})   # "AAAA..."
        vouched_user("B" * 40, {"client_key": "A" * 40}, {"R" * 40})   # "BBBB...": ignored
    """
    if sender is None or sender not in trusted:
        return sender
    key = header.get(F_CLIENT_KEY)
    return key if type(key) is str else None


@dataclass(frozen=True, slots=True)
class Caller:
    """Who sent a request: CURVE key (z85, None without CURVE), ``token`` field (None:
    absent) and the connection's ZeroMQ routing id."""

    key: str | None
    token: str | None
    peer: bytes

    @property
    def owner(self) -> str | None:
        """The owner of a stream this caller creates (None: anyone's)."""
        parts = []
        if self.key:
            parts.append(_CURVE + self.key)
        if self.token is not None:
            parts.append(_TOKEN + token_digest(self.token))
        return " ".join(parts) if parts else None

    @property
    def charge(self) -> str:
        """The identity a stream this caller creates counts against: the CURVE key, else
        the connection."""
        return _CURVE + self.key if self.key else "peer:" + self.peer.hex()


def permits(owner: str | None, caller: Caller) -> bool:
    """Whether ``caller`` may touch a stream of ``owner`` (constant-time comparisons)."""
    if owner is None:
        return True
    for part in owner.split(" "):
        if part.startswith(_CURVE):
            got = caller.key
        elif part.startswith(_TOKEN):
            got = None if caller.token is None else token_digest(caller.token)
        else:
            return False
        value = part.partition(":")[2]
        if got is None or not hmac.compare_digest(value.encode(), got.encode()):
            return False
    return True


def _charge_of(owner: str | None) -> str | None:
    """The identity a restored stream counts against: its CURVE key, if it has one."""
    if owner is None:
        return None
    return next((p for p in owner.split(" ") if p.startswith(_CURVE)), None)


class OwnerBook:
    """Each live stream's owner and charge, and open streams per charged identity.

    A creating request is first :meth:`claim` ed (refused over ``limit``); when the stream
    is created its claim becomes its ownership (:meth:`created`). Claims that did not lead
    to a stream are dropped each round (:meth:`drop_claims`).

    Args:
        limit: open streams per charged identity (0: no limit).
    """

    def __init__(self, limit: int = 0):
        if limit < 0:
            raise ValueError(f"the per-identity limit must be >= 0, got {limit}")
        self.limit = limit
        self._live: dict[str, tuple[str | None, str | None]] = {}  # stream -> (owner, charge)
        self._claims: dict[str, tuple[str | None, str]] = {}
        self._open: Counter[str] = Counter()  # charge -> live streams + claims

    def owner(self, stream: str) -> str | None:
        """The owner of live ``stream`` (None: anyone's, or not live)."""
        entry = self._live.get(stream)
        return entry[0] if entry else None

    def open_streams(self, charge: str) -> int:
        """Streams counted against ``charge`` (live ones and this round's claims)."""
        return self._open.get(charge, 0)

    def claim(self, stream: str, caller: Caller) -> bool:
        """``caller`` is admitted to create ``stream``; False when that would exceed the
        limit of its charged identity (nothing recorded then)."""
        self._unclaim(stream)  # a claim of this round that did not create the stream
        charge = caller.charge
        if self.limit and self._open.get(charge, 0) >= self.limit:
            return False
        self._claims[stream] = (caller.owner, charge)
        self._open[charge] += 1
        return True

    def created(self, stream: str) -> None:
        """``stream`` was created: its claim (if any) becomes its ownership."""
        claim = self._claims.pop(stream, None)
        if claim is not None:
            self._live[stream] = claim

    def released(self, stream: str) -> str | None:
        """``stream`` is gone (closed, expired, moved): its owner (None: anyone's)."""
        self._unclaim(stream)
        owner, charge = self._live.pop(stream, (None, None))
        self._discount(charge)
        return owner

    def drop_claims(self) -> None:
        """Forget the claims that did not create a stream (between rounds)."""
        for stream in list(self._claims):
            self._unclaim(stream)

    def restore(self, stream: str, owner: str | None) -> None:
        """``stream`` (live) belongs to ``owner`` (from a checkpoint); counted against its
        CURVE key, if it has one."""
        self.released(stream)
        charge = _charge_of(owner)
        if owner is not None or charge is not None:
            self._live[stream] = (owner, charge)
            if charge is not None:
                self._open[charge] += 1

    def owners(self) -> dict[str, str]:
        """``stream -> owner`` of the live streams that have one."""
        return {s: owner for s, (owner, _) in self._live.items() if owner is not None}

    def _unclaim(self, stream: str) -> None:
        claim = self._claims.pop(stream, None)
        if claim is not None:
            self._discount(claim[1])

    def _discount(self, charge: str | None) -> None:
        if charge is None:
            return
        left = self._open[charge] - 1
        if left > 0:
            self._open[charge] = left
        else:
            del self._open[charge]


def check_owner(value: Any, where: str) -> str | None:
    """An owner read from a checkpoint (None: anyone's); CheckpointError (naming ``where``)
    unless it is one as :class:`Caller` makes them."""
    if value is None:
        return None
    if type(value) is not str or not value.isascii() or len(value) > MAX_STR_BYTES or not all(
            p.startswith((_CURVE, _TOKEN)) for p in value.split(" ")):
        raise CheckpointError(f"{where}: not a stream owner")
    return value


def load_owners(value: Any, where: str) -> dict[str, str]:
    """A checkpoint's ``stream -> owner`` map (None: ``{}``); CheckpointError if malformed."""
    if value is None:
        return {}
    if type(value) is not dict or not all(type(s) is str for s in value):
        raise CheckpointError(f"{where} must be a map of stream ids to owners")
    return {s: check_owner(o, f"{where} of stream {s[:64]!r}") for s, o in value.items()}
