"""`ftlaunch convert`: a peer's training config (Axolotl, LLaMA-Factory) -> a run file, with the
report of every setting (login half).
"""
