"""Entry points: train.py (every launcher), cli.py (`dialtune`), and the commands' modules."""
import logging

# bitsandbytes' CPU backend warns at import that it cannot fetch an optional kernel from the hub
# (kernels-community): nothing is downloaded here, and CPU 4-bit runs without it
QUIET_LOGGERS = ("bitsandbytes.backends.cpu.ops",)


def quiet_loggers() -> None:
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
