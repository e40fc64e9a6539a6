"""``medge pki``: a site's CAs, certificate requests made on the device, signing and revocation.

Flow (docs/security.md): ``init`` once on the site's PKI host; ``request`` on each device (the
key is created there and stays there); ``issue-device`` / ``issue-operator`` / ``issue-server``
sign the request on the PKI host; ``revoke`` re-signs the CRL the broker reads (``crlfile``);
``crl`` re-signs the CRLs before they expire (daily timer).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medge.exitcodes import EXIT_FAILURE, EXIT_OK
from medge.pki import CA_DAYS, DEFAULT_DAYS, PkiError, Role, SitePki, create_request

DEFAULT_DIR = Path("/etc/medge/pki")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("pki", help="device and operator certificates for a site")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    def action(name: str, help_text: str, with_dir: bool = True) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = actions.add_parser(name, help=help_text)
        if with_dir:
            sub.add_argument("--dir", type=Path, default=DEFAULT_DIR,
                             help=f"the site's PKI directory (default {DEFAULT_DIR})")
        sub.add_argument("--json", action="store_true", help="machine-readable output")
        return sub

    init = action("init", "create the site's device and operator CAs")
    init.add_argument("--site", required=True, help="site name (as in [node] site)")
    init.add_argument("--days", type=int, default=CA_DAYS, help="CA lifetime in days")
    init.set_defaults(func=_init)

    request = action("request", "on the device: make a key (if missing) and a CSR",
                     with_dir=False)
    request.add_argument("name", help="the device's node name (= MQTT username)")
    request.add_argument("--key", type=Path, required=True, help="private key file (0600)")
    request.add_argument("--out", type=Path, required=True, help="where to write the CSR")
    request.add_argument("--san", action="append", default=[],
                         help="subject alternative name (DNS name or IP), for a broker")
    request.set_defaults(func=_request)

    for role in ("device", "operator", "server"):
        issue = action(f"issue-{role}", f"sign a {role} CSR (default lifetime "
                                        f"{DEFAULT_DAYS[role]} days)")
        issue.add_argument("name", help="the name the CSR must carry as its CN")
        issue.add_argument("--csr", type=Path, required=True)
        issue.add_argument("--out", type=Path, required=True, help="certificate file to write")
        issue.add_argument("--days", type=int, default=None)
        issue.set_defaults(func=_issue, role=role)

    revoke = action("revoke", "revoke every certificate of NAME and re-sign the CRL")
    revoke.add_argument("name")
    revoke.add_argument("--role", choices=["device", "operator"], default="device")
    revoke.set_defaults(func=_revoke)

    crl = action("crl", "re-sign both CRLs (before their nextUpdate passes)")
    crl.set_defaults(func=_crl)


Outcome = tuple[dict[str, Any], str]
"""What an action did: the ``--json`` document and the human sentence."""


def _run(action: Callable[[argparse.Namespace], Outcome]) -> Callable[[argparse.Namespace], int]:
    """Wrap an action: print its outcome, or one line naming what was refused and why."""

    def run(args: argparse.Namespace) -> int:
        try:
            document, text = action(args)
        except (PkiError, OSError) as exc:
            print(f"medge pki {args.action}: {exc}", file=sys.stderr)
            return EXIT_FAILURE
        print(json.dumps(document) if args.json else text)
        return EXIT_OK

    return run


@_run
def _init(args: argparse.Namespace) -> Outcome:
    SitePki(args.dir).init(args.site, args.days)
    return {"dir": str(args.dir)}, f"site CAs created in {args.dir}"


@_run
def _request(args: argparse.Namespace) -> Outcome:
    args.out.write_bytes(create_request(args.name, args.key, tuple(args.san)))
    return ({"csr": str(args.out), "key": str(args.key)},
            f"CSR for {args.name} in {args.out}; the key {args.key} stays on this machine")


@_run
def _issue(args: argparse.Namespace) -> Outcome:
    role: Role = args.role
    ca = SitePki(args.dir).ca(role)
    args.out.write_bytes(ca.issue(args.csr.read_bytes(), args.name, role, args.days))
    return ({"certificate": str(args.out), "ca": str(ca.cert_path)},
            f"{role} certificate for {args.name} in {args.out} (CA: {ca.cert_path})")


@_run
def _revoke(args: argparse.Namespace) -> Outcome:
    ca = SitePki(args.dir).ca(args.role)
    serials = ca.revoke(args.name)
    return ({"revoked": serials, "crl": str(ca.crl_path)},
            f"revoked {len(serials)} certificate(s) of {args.name}; CRL {ca.crl_path} "
            "re-signed: reload the broker (SIGHUP) to apply it")


@_run
def _crl(args: argparse.Namespace) -> Outcome:
    paths = SitePki(args.dir).refresh_crls()
    return {"crls": [str(p) for p in paths]}, "re-signed " + ", ".join(str(p) for p in paths)
