"""The prefix-scheduler process (calibration, throughput curve, allocation): not built yet."""
