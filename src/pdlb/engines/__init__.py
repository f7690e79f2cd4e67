"""Engines behind the scheduler service: what runs a DP rank's requests."""
