"""Loading the packaged models (and local model folders). Default targets need no family
knowledge: ``deltatune.core.roles`` finds them in any model's structure."""
