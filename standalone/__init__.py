"""Standalone mode: the four vod apps in one process with embedded back ends (``make run``).

This is the one module that imports all four services; they never import one another.
"""
