"""Benchmarks of deltatune side by side with peft (`make bench`, `deltatune bench`)."""
