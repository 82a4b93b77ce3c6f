"""Test-side tools shared by tests, fuzzers, benchmarks and the demo."""
