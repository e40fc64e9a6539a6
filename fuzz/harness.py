"""Coverage-guided atheris harness for one target: ``python -m fuzz.harness NAME [libFuzzer
options]``. The seeds of fuzz/seeds.py start the corpus; a crash (an exception that is not the
target's typed error) is written by libFuzzer as ``crash-…`` under the artifact prefix."""

from __future__ import annotations

import sys
from pathlib import Path

import atheris  # type: ignore[import-not-found,import-untyped,unused-ignore]  # make fuzz only

PROJECT = ["drivers", "daemons", "medge", "fuzz"]
"""Packages whose code gets coverage instrumentation (firmware_sim only makes the seeds)."""


def main(argv: list[str]) -> None:
    name, options = argv[1], argv[2:]
    from fuzz.seeds import seeds

    seed_inputs = seeds()[name]
    with atheris.instrument_imports(include=PROJECT):
        from fuzz.targets import all_targets

        target = all_targets()[name]
        for data in seed_inputs:  # the target's lazy imports happen here, instrumented
            target.run(data)
    corpus = Path("build/fuzz/corpus") / name
    corpus.mkdir(parents=True, exist_ok=True)
    for index, data in enumerate(seed_inputs):
        (corpus / f"seed-{index}").write_bytes(data)
    atheris.Setup([argv[0], *options, str(corpus)], target.run)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
