"""Built-in delta methods. Importing a method's package registers it."""

from . import adapter, bitfit, ia3, lora, prefix, prompt  # noqa: F401
