"""The one exception type of bad configuration: raised with a message that names the key, the value and the fix."""


class ConfigError(ValueError):
    pass
