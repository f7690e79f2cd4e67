"""Scheduler service: one DP worker with continuous batching over a real torch model."""
