"""The `pdlb` command line: local cluster, requests, dashboard and load generator."""
