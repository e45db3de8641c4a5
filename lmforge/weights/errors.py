"""The one error type every weight reader raises, so callers catch a single class and users see a sentence."""


class WeightFileError(ValueError):
    """A model path or weight file that cannot be read: missing, empty, corrupt, truncated or unsupported."""
