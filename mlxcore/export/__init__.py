"""Shipping a trained model: GGUF for llama.cpp / Ollama, quantized MLX, a hub upload, and a parity
gate that proves the exported file answers like the checkpoint it came from.

  gguf.py      any checkpoint we write (full, adapters -> fused, QLoRA -> dequantized) as GGUF
               (f16, q8_0, q4_0) with llama.cpp's metadata; vocab.py: its byte-exact BPE vocabulary
  ollama.py    a Modelfile with an explicit TEMPLATE translated from the chat template
  mlx_quant.py 4/8-bit MLX in the layout `mlx_lm.load` reads
  hub.py       push a dir to the Hugging Face Hub (HF_ENDPOINT / HF_TOKEN honoured)
  parity.py    the gate: llama.cpp's own tokenizer and greedy answers vs the checkpoint's
  run.py       all of the above into one dir without Prefect (`mlxcore export`)
"""
