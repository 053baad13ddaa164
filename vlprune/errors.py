"""One exception type, so callers can catch vlprune's own complaints about their input."""


class VlpruneError(ValueError):
    """Bad argument or unsupported model; the message names the parameter and what is allowed."""
