"""One exception type for problems the user can fix: front ends show its message as is, without a traceback."""


class FemurSegError(Exception):
    """A problem with the user's input or environment, phrased as what was wrong and what to do."""


class AlreadyExists(FemurSegError):
    """An output that is there already: refused unless the user asks to replace it. The message names the command
    line's ``--replace``; a GUI shows ``advice(<its own Replace control>)``, so no front end gives another's advice."""

    def __init__(self, before: str, after: str = "") -> None:
        self.before, self.after = before, after
        super().__init__(self.advice("--replace"))

    def advice(self, replace_control: str) -> str:
        return f"{self.before}{replace_control}{self.after}"
