"""Launching: shell text, the sbatch job (build -> render -> submit), `ftlaunch run` on this machine,
the rendezvous environment, the rank guardian, the run directory and its state files, checkpoint
folders as files (login half).
"""
