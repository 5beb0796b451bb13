"""The one error type a user sees: a mistake in their input, printed as a single line."""


class UserError(Exception):
    """A config, file, degree or checkpoint the user gave is not valid.

    The message is one line naming the key, file or tensor and what would be valid. The trainer
    prints it without a traceback and exits non-zero.
    """
