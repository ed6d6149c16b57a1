"""The HTTP surface: thin aiohttp handlers per API family (OpenAI, Ollama, Anthropic, WebSocket,
admin, health, pages), their wire schemas and bodies, SSE, and the error middleware.

The top of the layers: may import ``ops``, ``tasks``, ``index``, ``hub``, ``serving``, ``models``.
"""
