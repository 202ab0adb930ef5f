"""`ftlaunch validate`: the rule registry and every login-node check of a run and its inputs (data
files and rows, weights, tokenizer, chat template, attention kernels, Slurm values), and the
summary of a valid run (login half).
"""
