"""Embedding search over a table: the on-disk index (``store``), ``llmis index`` (``build``)
and the query (``search``, used by ``/v1/search`` and the ``answer`` preset).

May import ``serving`` (to embed), ``models`` and ``engine``.
"""
