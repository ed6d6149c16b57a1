"""The models a server knows: the manager (lifecycle, leases, swap), catalog entries,
the RAM budget, GGUF headers and model files.

May import ``engine``; nothing above it (no serving, no HTTP).
"""
