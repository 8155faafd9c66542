"""Built-in delta methods. Importing a method's package registers it."""

from . import lora, adapter, prefix, prompt, ia3, bitfit, head, dense, fusion, full  # noqa: F401  (registration order = listing order)
