"""What runs on the compute nodes (rank half): the per-rank entry point, the training loop,
collectives (one door), checkpoints, LR schedule, watchdog, metrics, fault injection, timeouts,
the per-node preflight and the export.
"""
