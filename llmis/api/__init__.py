"""Thin aiohttp handlers; the logic they call lives in the modules above."""
