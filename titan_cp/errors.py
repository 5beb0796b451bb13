"""The one error type a user sees (a mistake in their input, printed as a single line), and how
the ranks of a job agree to raise it together."""

import torch.distributed as dist


class UserError(Exception):
    """A config, file, degree or checkpoint the user gave is not valid.

    The message is one line naming the key, file or tensor and what would be valid. The trainer
    prints it without a traceback and exits non-zero.
    """


def first_error_of_any_rank(error: str | None) -> str | None:
    """The error message of the lowest rank that has one, on every rank (a collective)."""
    if dist.is_available() and dist.is_initialized():
        errors: list[str | None] = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e), None)
    return error


def raise_on_every_rank(error: str | None) -> None:
    """Raise `UserError` on every rank when any rank has an error message (the lowest rank's wins).

    A collective: call it on every rank. An error found on some ranks only would otherwise leave
    the others waiting in their next collective until the timeout.
    """
    error = first_error_of_any_rank(error)
    if error:
        raise UserError(error)
