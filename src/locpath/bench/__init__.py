"""`locpath bench`: stage-by-stage latency, throughput and memory against baselines and machine ceilings."""
