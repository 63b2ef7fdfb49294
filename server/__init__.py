"""Kestrel HTTP server: the OpenAI API in front of the engine."""
