"""The one error type of the data package."""

from __future__ import annotations


class DataError(ValueError):
    """Bad input data: an unreadable, mismatched or empty file or folder, or a bad argument.

    The message always names the offending file, folder, column or argument, so a user can find it.

    Example:
        >>> from diffusers_retina.data import DataError
        >>> issubclass(DataError, ValueError)
        True
    """
