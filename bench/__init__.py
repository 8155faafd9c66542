"""Benchmarks of deltatune side by side with peft (`make bench`, `python -m bench.run`)."""
