"""Benchmarks: functions that measure and return records; the CLI prints and plots them."""
