"""Importing diffusers with torchao installed logs what concerns neither a conversion nor its
user: torchao's GPU kernels that do not load on a CPU-only machine, torch's notes on enum
registrations, diffusers' note on legacy torchao tensor classes. Those loggers are held at ERROR
while the libraries are first imported; a real error still shows."""

from __future__ import annotations

import logging
from contextlib import contextmanager

NOISY_LOGGERS = ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer")


def quiet_for_good() -> None:
    """The command line's choice: those loggers stay at ERROR for the whole process, whichever
    import (diffusers' lazy modules, a backend, a pipeline class) first loads torchao. The Python
    API leaves the process's logging alone and quiets only its own imports (quiet_imports)."""
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


@contextmanager
def quiet_imports():
    # Only loggers not at ERROR already are touched: setLevel clears the cache of every logger in
    # the process (thousands once torch and diffusers are imported), which made each call ~0.1 ms.
    loggers = [lg for lg in map(logging.getLogger, NOISY_LOGGERS) if lg.level != logging.ERROR]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
