"""The one exception type for bad input.

Every problem with a user's files (missing, truncated, lying headers, bad configs, NaN weights, nothing to
compare) is raised as :class:`InputError`, whose message is one line: ``<file>: <problem>``. The CLI prints that
line and exits with status 2; library callers can catch it.
"""


class InputError(ValueError):
    """Bad input, named by the file (or tensor source) it came from and a one-line description."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = " ".join(str(problem).split())  # always a single line
        super().__init__(f"{self.path}: {self.problem}")
