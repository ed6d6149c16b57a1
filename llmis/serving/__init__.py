"""A validated request turned into engine jobs and back: generation, embeddings, the OpenAI
request schemas every API translates onto, tools, trimming, stream chunking, request policy.

May import ``models`` and ``engine``; never ``ops`` or ``api`` (the policy comes in as a parameter).
"""
