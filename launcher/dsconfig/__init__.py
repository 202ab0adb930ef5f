"""The DeepSpeed config: preset + run file (+ a user's JSON with "auto") -> the complete DeepSpeed
dict, and DeepSpeed's key tables (login half).
"""
