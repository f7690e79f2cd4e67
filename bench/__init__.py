"""pdlb benchmarks (`make bench`): tables and ratios against baselines run side by side."""
