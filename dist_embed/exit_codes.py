"""Exit codes of every dist-embed command and the marker files workers leave for their launcher.

0 done; 1 failure in training; 2 bad configuration or input (one line says what and where);
75 (EX_TEMPFAIL) stopped by SIGTERM/SIGUSR1 after writing a checkpoint: requeue and --resume latest;
76 a peer was lost (a node killed, cut off or frozen; a worker killed): restart and --resume latest.
"""
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
EXIT_PREEMPTED = 75
# the job lost a peer: nothing is wrong with the run itself, so the Slurm script runs it again (and
# Ray restarts its worker group); a worker whose process group broke under it exits with this too
EXIT_PEER_LOST = 76
BAD_INPUT_MARKER = "BAD_INPUT"  # written by a rank that stopped on bad input, in output_dir
PREEMPTED_MARKER = "PREEMPTED"  # written by rank 0 after the checkpoint of a stop signal: its path
WORKER_LOGS = "logs"  # output_dir/logs/rank<R>.log: a worker's traceback when its process group broke
