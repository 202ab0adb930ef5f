"""Shared utilities every room uses: the one logging setup (login half).
"""
