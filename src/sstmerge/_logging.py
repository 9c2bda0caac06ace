"""Logging and progress-bar set-up (library code only calls ``logging.getLogger(__name__)``)."""

from __future__ import annotations

import logging
import os


def quiet() -> bool:
    """True when progress bars should be hidden (``--quiet`` or ``SSTMERGE_QUIET=1``)."""
    return os.environ.get("SSTMERGE_QUIET", "") not in ("", "0") or logging.getLogger("sstmerge").getEffectiveLevel() > logging.INFO


def setup_logging(verbosity: int = 0, quiet_mode: bool = False) -> None:
    """Route ``sstmerge`` logs to stderr through rich; ``quiet_mode`` shows warnings/errors only."""
    from rich.console import Console
    from rich.logging import RichHandler

    level = logging.WARNING if quiet_mode else (logging.DEBUG if verbosity > 0 else logging.INFO)
    if quiet_mode:
        os.environ["SSTMERGE_QUIET"] = "1"
    logger = logging.getLogger("sstmerge")
    logger.handlers.clear()
    handler = RichHandler(console=Console(stderr=True), show_path=False, show_time=False, markup=False)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    for noisy in ("transformers", "peft"):
        logging.getLogger(noisy).setLevel(logging.ERROR if quiet_mode else logging.WARNING)
    if quiet_mode:  # transformers' own progress bars ("Loading weights") ignore the logging level
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except ImportError:  # pragma: no cover
            pass
