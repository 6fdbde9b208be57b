"""Generate the demo models: ``python -m deployments.demo_models [--dir models] [--force]``."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from deployments.demo_models import gguf_llama, idefics3

logger = logging.getLogger("deployments.demo_models")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", type=Path, default=Path("models"), help="output folder (default: models)")
    parser.add_argument("--force", action="store_true", help="regenerate files that already exist")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for spec in gguf_llama.SPECS.values():
        started = time.perf_counter()
        paths = gguf_llama.generate(spec, args.dir, force=args.force)
        sizes = ", ".join(f"{p.name} ({p.stat().st_size / 2**20:.1f} MiB)" for p in paths)
        logger.info("%s ready in %.1fs: %s", spec.name, time.perf_counter() - started, sizes)
    started = time.perf_counter()
    folder = idefics3.generate(args.dir, force=args.force)
    size = sum(f.stat().st_size for f in folder.iterdir())
    logger.info("%s ready in %.1fs: %s (%.1f MiB)", idefics3.NAME, time.perf_counter() - started, folder, size / 2**20)


if __name__ == "__main__":
    main()
