"""Training: the one loop every objective trains through, and the child process that runs it.

    loop.py         fit(model, ..., optimizer=, loss=): warmup + cosine, clipping, accumulation,
                    checkpoints and exact resume; TrainJob (pretrain / SFT / LoRA)
    losses.py       Loss: token cross-entropy (dense, chunked, sparse) and the base new
                    objectives subclass (the RL objectives live in `mlxcore.rl.objectives` and `mlxcore.rl.ppo`)
    step.py         the compiled value-and-grad + optimizer step
    optimizers.py   AdamW / Adafactor / Muon / SGD with the schedule
    callbacks.py    progress bar, JSONL metrics, the event pipe to the parent
    launch.py       `python -m mlxcore.train.launch JOB.json`: one entry for every job kind
    distributed.py  data-parallel groups (mlx.launch ring / MPI)
"""
