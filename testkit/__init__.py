"""Test and benchmark fixtures, outside the product packages: tiny random checkpoints and adapters
(tiny), extension helpers (extensions), real daemons and task processes started and waited on by
their own signals (launch), fault injection into task processes (faults) and the socket fuzzer
(fuzz). tests/ and bench/ both import from here; nothing in fmplexd/, tasklets/, ipc/, kernels/ or
fmplex/ does."""
