"""User-facing errors: the CLI prints them on one line and exits with status 2."""


class CdeltaError(Exception):
    """A problem with the user's input or environment, phrased as "problem; fix"."""

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}. {fix}" if fix else problem)
