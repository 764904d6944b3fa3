"""Wire protocol, transports and shared memory shared by the daemon, task processes and clients.

Nothing in ipc/ imports torch at module import time: task processes and clients stay lean.
"""
