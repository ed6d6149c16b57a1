"""Operating the server: logging and request ids, auth, CORS and Origin checks, rate limits,
the content filter, per-request policy (caps, timeouts), metrics, shutdown, and their wiring.

May import ``tasks``, ``index``, ``serving``, ``models`` and ``engine``; never ``api``.
"""
