"""Decoding methods by name: what the harness, the CLI (and later the server) run.

A method (``method.Method``) wraps a decode loop with its engines, drafter and
policies; ``registry`` builds one by name from the target engine and
``MethodOptions``.
"""
