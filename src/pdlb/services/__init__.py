"""The three pdlb services: dispatcher, bootstrap and scheduler."""
