"""``python -m lorafft`` and the ``lorafft`` console script: the command, answering Ctrl-C from its first instruction.

Until the command's modules are imported, SIGINT (Ctrl-C) and SIGTERM end the process at once with one line and the
usual status (130, 143): there is nothing to clean up yet, and Python would print a traceback of whatever import
it was in. From then on both raise KeyboardInterrupt, so the command removes its temporaries, keeps a scan's journal
and prints ``lorafft: interrupted`` (:func:`lorafft.cli.main`, status 130).
"""

import os
import signal
import sys


def _quit(signum, frame) -> None:
    os.write(2, b"lorafft: interrupted\n")
    os._exit(128 + signum)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main() -> int:
    """Run the ``lorafft`` command line (``sys.argv``) and return its exit status."""
    signal.signal(signal.SIGINT, _quit)
    signal.signal(signal.SIGTERM, _quit)
    from lorafft.cli import main as run

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return run()
    finally:  # what remains is the interpreter's exit: nothing to clean up, nothing to say twice
        signal.signal(signal.SIGINT, _quit)
        signal.signal(signal.SIGTERM, _quit)


if __name__ == "__main__":
    sys.exit(main())
