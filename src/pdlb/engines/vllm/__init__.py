"""A running vLLM OpenAI server's DP rank as a pdlb engine (see engine.py)."""
