"""Models: build a LLaMA-family model from a config or load one (ours, Hugging Face, mlx-lm),
attach LoRA/DoRA/QLoRA adapters, save/load/fuse checkpoints, recompute activations
(gradient checkpointing) and generate text. No training loop here (that is `mlxcore.train`).

    model.py       from_config / hf_config / load / save_weights / num_params
    adapters.py    LoRA, DoRA, QLoRA on a frozen base (mlx-lm's adapter layout)
    checkpoint.py  load any model or adapter dir, save a model dir, fuse adapters
    layout.py      what makes a dir a model dir or an adapter dir (the one place)
    generate.py    chat-template loading, sampling, replies
    remat.py       gradient checkpointing every N layers
    segments.py    packed SFT rows in mlx-lm's decoders: attention within each row, positions from 0
    moe.py         mixtures of experts (qwen3_moe): router load-balancing loss and statistics, HF expert layout
    retention.py   Power Retention (model_type `retention`): quadratic / chunked / recurrent forms, its cache
    mlx_lm_cli.py  mlx-lm's CLI (server) able to open retention checkpoints
"""
