"""``make audit``: pip-audit over the installed dependencies; fails on what it cannot vouch for.

pip-audit alone exits 0 with "No known vulnerabilities found" even when it could not look a
package up (offline, a mirror-only version, a private package): an audit that checked nothing
would pass. Here a dependency that could not be audited fails the audit as clearly as a known
vulnerability does. Usage: ``python scripts/audit.py [PYTHON]`` (default: this interpreter).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    python = argv[0] if argv else sys.executable
    pip_audit = Path(python).parent / "pip-audit"
    result = subprocess.run(
        [str(pip_audit), "--local", "--skip-editable", "--progress-spinner", "off",
         "--format", "json"],
        capture_output=True, text=True, check=False,
    )
    try:
        report = json.loads(result.stdout)
    except json.JSONDecodeError:
        print("audit: FAILED - pip-audit produced no report; it probably cannot reach PyPI's "
              "advisory data (https://pypi.org/pypi/NAME/VERSION/json):", file=sys.stderr)
        print(result.stderr.strip(), file=sys.stderr)
        return 1
    vulnerable = [d for d in report["dependencies"] if d.get("vulns")]
    unaudited = [d for d in report["dependencies"] if "skip_reason" in d]
    audited = len(report["dependencies"]) - len(unaudited)
    for dependency in vulnerable:
        for vuln in dependency["vulns"]:
            fixed = ", ".join(vuln.get("fix_versions") or []) or "no fix yet"
            print(f"VULNERABLE {dependency['name']} {dependency['version']}: {vuln['id']} "
                  f"(fixed in: {fixed})")
    for dependency in unaudited:
        print(f"NOT AUDITED {dependency['name']}: {dependency['skip_reason']}")
    print(f"audit: {audited} dependencies checked against PyPI's advisory data, "
          f"{len(vulnerable)} vulnerable, {len(unaudited)} could not be checked")
    if vulnerable:
        print("audit: FAILED - known vulnerabilities (upgrade the pins above)", file=sys.stderr)
        return 1
    if unaudited:
        print("audit: FAILED - PyPI's advisory data could not be reached for the dependencies "
              "listed as NOT AUDITED (offline, or versions that PyPI does not know)",
              file=sys.stderr)
        return 1
    print("audit: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
