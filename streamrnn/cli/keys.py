"""``streamrnn keys``: make the secret files a deployment needs, readable by their owner only.

Two kinds::

    streamrnn keys curve keys server     # keys/server.key (0644), keys/server.key_secret (0600)
    streamrnn keys hmac keys/ckpt.key    # 32 random bytes, hex (0600): --checkpoint-key FILE

The CURVE pair is a ZeroMQ certificate, the format ``zmq.auth.load_certificate`` reads
(``--curve-secret-key``, ``--curve-allow``, ``Client(curve_keypair=...)``). A secret file is
created with mode 0600 from the start (``os.open(..., 0o600)``, never chmod afterwards), so
no other user can open it in between. Existing files are left alone unless ``--force``.

The HMAC key signs worker checkpoints and published weights: give every process of a
deployment the same file with ``--checkpoint-key FILE`` or ``$STREAMRNN_CHECKPOINT_KEY``
(:func:`add_checkpoint_key_argument`; :func:`streamrnn.security.checkpoint_key` reads it).
"""

from __future__ import annotations

import argparse
import datetime
import os
import secrets
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "add_arguments",
    "add_checkpoint_key_argument",
    "main",
    "make_curve_pair",
    "make_hmac_key",
    "run",
]

_BANNER = ("#   ****  Generated on {now} by streamrnn keys  ****\n"
           "#   ZeroMQ CURVE {kind} Certificate\n"
           "{note}\n")
_SECRET_NOTE = "#   DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its permissions.\n"


def _write_new(path: Path, text: str, mode: int, force: bool) -> None:
    """Create ``path`` with ``mode`` (then ``text``); FileExistsError unless ``force``."""
    if force:
        path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)


def _certificate(kind: str, public: bytes, secret: bytes | None) -> str:
    text = _BANNER.format(now=datetime.datetime.now().isoformat(timespec="seconds"),
                          kind="**Secret**" if secret else "Public",
                          note=_SECRET_NOTE if secret else "")
    text += f'metadata\ncurve\n    public-key = "{public.decode()}"\n'
    if secret:
        text += f'    secret-key = "{secret.decode()}"\n'
    return text


def make_curve_pair(directory: str | os.PathLike, name: str, force: bool = False
                    ) -> tuple[Path, Path]:
    """Write ``<directory>/<name>.key`` (0644) and ``<name>.key_secret`` (0600); returns
    ``(public file, secret file)``."""
    import zmq

    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.curve_keypair()
    public_file, secret_file = root / f"{name}.key", root / f"{name}.key_secret"
    if not force:
        for path in (public_file, secret_file):
            if path.exists():
                raise FileExistsError(f"{path} exists (pass --force to replace it)")
    _write_new(secret_file, _certificate("secret", public, secret), 0o600, force)
    _write_new(public_file, _certificate("public", public, None), 0o644, force)
    return public_file, secret_file


def make_hmac_key(path: str | os.PathLike, force: bool = False) -> Path:
    """Write 32 random bytes, hex-encoded, to ``path`` (0600); returns the path."""
    path = Path(path)
    if path.parent != Path(""):
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        _write_new(path, secrets.token_hex(32) + "\n", 0o600, force)
    except FileExistsError:
        raise FileExistsError(f"{path} exists (pass --force to replace it)") from None
    return path


def add_checkpoint_key_argument(parser: argparse.ArgumentParser, signs: str) -> None:
    """``--checkpoint-key FILE`` (default: ``$STREAMRNN_CHECKPOINT_KEY``); ``signs`` says
    what this process signs or checks with it."""
    parser.add_argument("--checkpoint-key", default=None, metavar="FILE",
                        help=f"HMAC-SHA256 key file (streamrnn keys hmac FILE) that {signs}; "
                             "files not signed with it are refused (default: the file "
                             "$STREAMRNN_CHECKPOINT_KEY names, else no key)")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``streamrnn keys curve DIR NAME`` and ``streamrnn keys hmac FILE``."""
    kinds = parser.add_subparsers(dest="kind", metavar="KIND", required=True)
    curve = kinds.add_parser("curve", help="a CURVE key pair: NAME.key and NAME.key_secret",
                             description="Write DIR/NAME.key (public, 0644) and "
                                         "DIR/NAME.key_secret (secret, 0600).")
    curve.add_argument("directory", metavar="DIR")
    curve.add_argument("name", metavar="NAME")
    hmac = kinds.add_parser("hmac", help="an HMAC key for --checkpoint-key",
                            description="Write 32 random bytes (hex) to FILE, mode 0600.")
    hmac.add_argument("file", metavar="FILE")
    for sub in (curve, hmac):
        sub.add_argument("--force", action="store_true", help="replace existing files")
    return parser


def run(args: argparse.Namespace) -> int:
    """Make the key(s); exit status 1 if a file exists already (without --force)."""
    try:
        if args.kind == "curve":
            public, secret = make_curve_pair(args.directory, args.name, args.force)
            print(f"public key {public} (0644: give it to the other side)\n"
                  f"secret key {secret} (0600: keep it here)")
        else:
            print(f"HMAC key {make_hmac_key(args.file, args.force)} (0600: give the same "
                  "file to every worker and trainer, --checkpoint-key)")
    except (FileExistsError, OSError) as exc:
        print(f"streamrnn keys: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m streamrnn.cli.keys``; returns the exit status."""
    parser = add_arguments(argparse.ArgumentParser(
        prog="python -m streamrnn.cli.keys", description="make secret key files"))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
