"""The learner's one error type: a run that cannot go on, with a message that says why."""


class LearnerError(RuntimeError):
    """Reported as one line (no traceback): a service refused, a replica is out of step, bad data."""
