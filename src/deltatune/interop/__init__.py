"""Moving deltas to and from other libraries' formats (peft's adapter folders)."""

from .peft import export_peft, import_peft, load_peft, read_peft_config, save_peft

__all__ = ["export_peft", "import_peft", "load_peft", "read_peft_config", "save_peft"]
