"""Bootstrap service: room -> prefill rank records for PD disaggregation."""
