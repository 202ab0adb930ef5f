"""The run file: typed schema and defaults, the YAML reader with its file lines, overrides, sizes,
batch and step arithmetic, secrets, and the error type every problem is reported in (login half).
"""
