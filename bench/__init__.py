"""Benchmarks (not tests): step time and overhead of our trainer against a bare diffusers + peft loop."""
