"""The prefix scheduler (DSPARK.md §4–§5): numbers and arrays only, no model objects.

    calibration.py  sequential temperature scaling of the drafter's confidences, ECE/AUROC,
                    reliability diagram, calibration.json next to the drafter, online ECE
    throughput.py   the throughput curve SPS(B): step-shaped lookup, JSON cache per model+hardware
    allocate.py     Algorithm 1 (greedy with early stop), the global capacity search, top-K admission
    process.py      the scheduler process: snapshots in, capacities out, over a local socketpair
    policy.py       the engine's allocation policy: capacity from two rounds earlier, late and
                    dead-process handling, counters
    cli.py          `dspark calibrate`, `dspark profile`
NumPy only, except cli.py's handlers (which load the engine).
"""
