"""The exception types a user sees (bad input, results that cannot be right), and how names are shown to them.

Every problem with a user's files (missing, truncated, lying headers, bad configs, NaN weights, nothing to
compare) is raised as :class:`InputError`, whose message is one line: ``<file>: <problem>``. The CLI prints that
line and exits with status 2; library callers can catch it. :class:`InternalError` is lorafft's own failure: a
number no correct computation gives (a max |cos| above 1), raised instead of a report row that would be wrong.
Every name lorafft prints, draws or writes into a page passes through :func:`printable`.
"""


def plural(count: int, singular: str, plural_form: str) -> str:
    """``"1 matrix"``, ``"2 matrices"``: the count and the word that agrees with it."""
    return f"{count} {singular if count == 1 else plural_form}"


def printable(text) -> str:
    """``str(text)`` with any character UTF-8 cannot encode (a lone surrogate: how Python decodes a file name or a
    pickled tensor name that is not UTF-8) written as its escape, ``\\udcff``: safe to print to a strict UTF-8
    stream, to draw and to write."""
    return str(text).encode("utf-8", "backslashreplace").decode("utf-8")


class InputError(ValueError):
    """Bad input, named by the file (or tensor source) it came from and a one-line description."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = " ".join(str(problem).split())  # always a single line
        super().__init__(f"{self.path}: {self.problem}")


class InternalError(RuntimeError):
    """A result that cannot be right (lorafft's bug, or hardware): never written as a row."""

    def __init__(self, problem: str):
        super().__init__(" ".join(str(problem).split()))


class WrongBasis(InputError):
    """A base basis (read from a cache) that does not answer for its matrix: ``rows`` of the batch failed the check
    of its top vectors against W0. The caller names the cache entry."""

    def __init__(self, rows: list[int]):
        self.rows = rows
        super().__init__("base cache", f"the basis of matrix {rows[0]} of this batch does not answer for its W0")
