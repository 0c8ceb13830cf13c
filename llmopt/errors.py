"""The error a user can act on, shared by the config layer and the transform registry (below both)."""


class ConfigError(ValueError):
    """A config that cannot be used as written; the message says which field and what to change."""
