"""What every entry point does with bad input: the one-line reason, exit status 2.

A `ValueError` raised while an entry point validates its config or its input (a value
the schema rejects, a checkpoint that is not one, a task the model lacks) is a user's
mistake: `exits_on_bad_input` prints `<entry point>: <message>` to stderr and exits with
status 2, without Hydra's "Error executing job" and the traceback. Anything else is a
bug and keeps its traceback; so does a ValueError when `HYDRA_FULL_ERROR=1`.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import ParamSpec

USAGE_ERROR = 2

P = ParamSpec("P")


def exits_on_bad_input(name: str) -> Callable[[Callable[P, None]], Callable[P, None]]:
    """Decorate an entry point's `main(cfg)` (under `@hydra.main`)."""

    def decorate(main: Callable[P, None]) -> Callable[P, None]:
        @functools.wraps(main)
        def wrapped(*args: P.args, **kwargs: P.kwargs) -> None:
            try:
                main(*args, **kwargs)
            except ValueError as error:
                if os.environ.get("HYDRA_FULL_ERROR") == "1":
                    raise
                print(f"{name}: {error}", file=sys.stderr, flush=True)
                sys.exit(USAGE_ERROR)

        return wrapped

    return decorate
