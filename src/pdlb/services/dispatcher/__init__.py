"""Dispatcher service: the DP controller."""
