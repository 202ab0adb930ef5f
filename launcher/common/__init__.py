"""Shared utilities every room uses: the one logging setup, atomic files, forked workers (login half).
"""
