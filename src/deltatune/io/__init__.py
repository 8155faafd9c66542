"""Delta files: fingerprints of the base, atomic writes, safetensors + JSON artifacts."""
