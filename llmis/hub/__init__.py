"""Getting and listing model files: the Hugging Face client, ``llmis pull`` and ``llmis models``.

May import ``models``; it runs no model.
"""
