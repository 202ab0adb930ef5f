"""Names inside a run directory, and the exit codes (and one environment variable) ranks and
scripts agree on."""

RESOLVED = "resolved.yaml"        # the run file with every default filled in, absolute paths
DS_CONFIG = "ds_config.json"      # the complete DeepSpeed config the ranks use
PLAN = "plan.txt"                 # the memory plan
JOB_SCRIPT = "job.sbatch"         # the rendered Slurm script
METRICS = "metrics.jsonl"         # one JSON object per logged step / eval
FREEZE_REPORT = "freeze_report.txt"
CHECKPOINTS = "checkpoints"       # checkpoints/step-00000100/ ... each complete one has MANIFEST
FINAL = "final"                   # exported Hugging Face folder (or LoRA adapter + merged/)
LOGS = "logs"                     # per-job / per-node logs
STOP_REQUEST = "STOP"             # file: its presence asks every rank to checkpoint now and exit
TENSORBOARD = "tensorboard"       # TensorBoard event files (output.report_to)
WANDB = "wandb"                   # W&B's offline runs and the run id (output.report_to)
JOB_LOCK = "job.lock"              # the Slurm job that owns the run directory: its id (launcher/cluster/job_lock.py)
ESTIMATE = "estimate.json"        # the time estimate cluster.time auto was set from
EXIT_STATUS = "exit_status.json"  # how the run ended: {"code", "step", "checkpoint", "message", "rank", "host", "time"}
LAUNCHED_ENV = "FTLAUNCH_LAUNCHED_AT"  # the launcher's time.time() as it starts torchrun (rank/startup.py)
TIME_SAVE_ENV = "FTLAUNCH_TIME_SAVE"  # =1: a dry run's ranks time one checkpoint save (rank/loop_steps.py)
STEPS = "steps.json"              # an epoch run's steps, counted by rank 0 (cluster/run_state.py)
STARTUP = "startup.json"          # the last launch's rank 0 start-up, by phase (rank/startup.py)
SEGMENTS = "segments.jsonl"       # one line per launch: step, world_size, job, time (cluster/reshard.py)

EXIT_OK = 0
EXIT_CONFIG = 2                   # bad run file / bad input, nothing ran
EXIT_STOPPED = 75                 # stopped on request (signal or STOP file) after a checkpoint: resumable
EXIT_DIVERGED = 76                # the loss watchdog stopped the run (NaN/Inf or too high a loss) after a
                                  # checkpoint of the last good step; the Slurm job never requeues it
EXIT_LOCKED = 73                  # the Slurm job found another live job's lock and touched nothing
EXIT_PREFLIGHT = 78                # the job stopped: the preflight refused its nodes, no restarts left
