"""Fault drills on a local Ray under load: `python -m loadtest.drills.<name>`, each ending in one JSON line."""
