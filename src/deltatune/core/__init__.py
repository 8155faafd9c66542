"""Method-independent machinery: configs, registry, targeting, slots, attach, merge."""
