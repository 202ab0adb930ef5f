"""After and during a run, from its files: `ftlaunch status` and `ftlaunch stop` (login half).
"""
