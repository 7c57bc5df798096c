"""One exception type for problems the user can fix: front ends show its message as is, without a traceback."""


class FemurSegError(Exception):
    """A problem with the user's input or environment, phrased as what was wrong and what to do."""
