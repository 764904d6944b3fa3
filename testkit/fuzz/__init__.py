"""Fuzzing machinery shared by tests and benchmarks: frame mutations and the socket fuzzer."""
