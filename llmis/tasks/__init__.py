"""Task presets addressed as model ids (summarize, classify, answer, extract, config ones):
the registry and the planning that turns a preset request into an ordinary chat.

May import ``index``, ``serving``, ``models`` and ``engine``.
"""
