"""The one error type of the data package: :class:`DataError`, defined beside the decoders it shares with the
pipelines (:mod:`diffusers_retina.image_processing.decoding`)."""

from ..image_processing.decoding import DataError

__all__ = ["DataError"]
