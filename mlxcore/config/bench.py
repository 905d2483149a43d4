"""Bench, eval and export (GGUF / MLX quantized / Ollama, the parity gate, hub push)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from mlxcore.clients.secrets import KeyedEndpoint
from mlxcore.models.layout import is_model_dir
from mlxcore.config.base import ConfigError, _Run, _Strict


BENCH_SUITES = ("math_mcq", "qa", "logic", "knowledge", "sort", "json", "copy")
SuiteName = Literal["math_mcq", "qa", "logic", "knowledge", "sort", "json", "copy"]


class BenchTarget(KeyedEndpoint, _Strict):
    """One column of a bench report: our checkpoint, an export of it (`gguf`: a GGUF file run by
    llama.cpp; `mlx-quantized`: a quantized MLX dir, or a float one quantized in memory), an Ollama
    model, an OpenAI-compatible endpoint, or `random` (a uniformly random answer from each
    question's answer space)."""

    kind: Literal["checkpoint", "gguf", "mlx-quantized", "ollama", "openai", "random"]
    name: str | None = Field(None, description="Its label in the report; default: the dir name, the model, 'random'.")
    path: str | None = Field(None, description="checkpoint / mlx-quantized: a local model dir; gguf: a .gguf file.")
    bits: Literal[4, 8] = Field(4, description="mlx-quantized, on a float model: quantize to this many bits.")
    group_size: Literal[32, 64, 128] = Field(64, description="mlx-quantized, on a float model: weights per scale.")
    url: str | None = Field(None, description="ollama (default http://127.0.0.1:11434) / openai: the server's base URL.")
    model: str | None = Field(None, description="ollama / openai: the model name the server knows.")
    workers: int = Field(4, ge=1, description="ollama / openai: concurrent requests.")
    timeout_s: float = Field(120, gt=0)

    @model_validator(mode="after")
    def _check(self) -> "BenchTarget":
        if self.kind in ("checkpoint", "mlx-quantized") and not self.path:
            raise ValueError(f"a {self.kind} target needs path=/path/to/model")
        if self.kind == "gguf" and not (self.path and self.path.endswith(".gguf")):
            raise ValueError("a gguf target needs path=/path/to/model.gguf")
        if self.kind in ("ollama", "openai") and not self.model:
            raise ValueError(f"an {self.kind} target needs model=<name>")
        if self.kind == "openai" and not self.url:
            raise ValueError("an openai target needs url=http://HOST:PORT (the server's base URL)")
        return self

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if self.kind in ("checkpoint", "mlx-quantized", "gguf"):
            path = Path(self.path)
            label = path.parent.name if path.name == "model" else path.stem if self.kind == "gguf" else path.name
            return label + (f"-mlx{self.bits}" if self.kind == "mlx-quantized" else "")
        return self.model if self.kind in ("ollama", "openai") else "random"


class BenchConfig(_Strict):
    """Synthetic bench suites scored per kind (see mlxcore/bench); every target answers the same questions."""

    suites: list[SuiteName] = Field(list(BENCH_SUITES), min_length=1)
    examples: int = Field(40, gt=0, description="Questions per suite.")
    seed: int = Field(0, description="Which questions: each is a pure function of (suite, seed, index).")
    max_tokens: int = Field(64, gt=0, description="Reply length limit (greedy decoding everywhere).")
    batch_size: int = Field(32, gt=0, description="checkpoint targets: questions generated per batch.")
    targets: list[BenchTarget] = Field([BenchTarget(kind="random")],
                                       description="Besides the flow's own model (pipeline, distill, rl).")

    @model_validator(mode="after")
    def _unique(self) -> "BenchConfig":
        labels = [t.label for t in self.targets]
        if len(set(labels)) != len(labels):
            raise ValueError(f"targets need distinct names, got {labels}: set name= on each")
        return self


def _demo_targets() -> list[BenchTarget]:
    return [BenchTarget(kind="checkpoint", path="runs/demo/model", name="demo"), BenchTarget(kind="random")]


class BenchRunConfig(_Run, BenchConfig):
    """The `bench` flow alone: its targets side by side (default: the demo pipeline's model vs random)."""

    name: str = Field("bench", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    out_dir: str = Field("runs", description="Answers and reports go to <out_dir>/<name>/.")
    targets: list[BenchTarget] = Field(default_factory=_demo_targets, min_length=1)


class EvalConfig(_Run, _Strict):
    """The `eval` flow: held-out loss and perplexity of a checkpoint on files tokenized with its tokenizer."""

    name: str = Field("eval", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    out_dir: str = Field("runs", description="Tokenized data and metrics go to <out_dir>/<name>/.")
    checkpoint: str = Field("runs/demo/model", description="A local model dir (its tokenizer is used).")
    data: list[str] = Field(["runs/demo/data-*/sft/val.jsonl"], min_length=1,
                            description="Held-out files or download specs (as in data.sft.val).")
    kind: Literal["sft", "pretrain"] = Field("sft", description="sft: loss on assistant tokens; pretrain: every token.")
    format: Literal["auto", "text", "conversations", "instruction", "alpaca", "gsm8k"] = "auto"
    system_prompt: str | None = None
    batch_size: int = Field(16, gt=0)
    seq_len: int = Field(256, gt=0)
    max_batches: int | None = Field(None, gt=0, description="Evaluate only the first N batches.")
    max_download_mb: float = Field(2048, gt=0)

    def check_checkpoint(self) -> None:
        if not is_model_dir(self.checkpoint):
            raise ConfigError(f"checkpoint: {self.checkpoint!r} is not a local model dir (no config.json); "
                              "set checkpoint=/path/to/model (or run `mlxflow run pipeline` for runs/demo/model)")


GGUF_TYPES = ("f16", "q8_0", "q4_0")
ExportFormat = Literal["f16", "q8_0", "q4_0", "mlx-4bit", "mlx-8bit"]


class GateTolerance(_Strict):
    """Points of bench accuracy (0-100) any suite may lose against the checkpoint; null: reported only."""

    f16: float | None = Field(1.0, ge=0)
    q8_0: float | None = Field(2.0, ge=0)
    q4_0: float | None = Field(None, ge=0)


class ParityGateConfig(_Strict):
    """Is the shipped GGUF the trained model? llama.cpp (llama-cpp-python) tokenizes text and answers the
    bench; the gate fails on any token id that differs from ours, or a suite's accuracy drop past
    `tolerance`. Its answers are also the bench's `gguf` column."""

    suites: list[SuiteName] = Field(list(BENCH_SUITES), min_length=1)
    examples: int = Field(100, gt=0, description="Bench questions per suite, answered greedily by both (100: one "
                                                 "answer is one point, finer than the tolerances).")
    max_tokens: int = Field(64, gt=0)
    seed: int = 0
    text: list[str] = Field([], description="Text files or dirs (.txt, .jsonl, ...) whose first `text_bytes` "
                                            "both tokenize, besides the bench prompts and every vocabulary entry.")
    text_bytes: int = Field(1_000_000, gt=0)
    tolerance: GateTolerance = GateTolerance()
    fail: bool = Field(True, description="A failed gate fails the flow; false: report it only.")


class HubPushConfig(KeyedEndpoint, _Strict):
    """Upload the exports to a Hugging Face Hub model repo (huggingface_hub; HF_ENDPOINT / HF_TOKEN honoured)."""

    repo_id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$",
                         description="owner/name of the model repo (created if missing).")
    endpoint: str | None = Field(None, description="The hub's base URL; default $HF_ENDPOINT, else huggingface.co.")
    private: bool = False
    revision: str = "main"


class ExportConfig(_Strict):
    """Ship a checkpoint: GGUF (+ an Ollama Modelfile) and quantized MLX, gated on parity with llama.cpp."""

    formats: list[ExportFormat] = Field(["q8_0"], min_length=1,
                                        description="f16 / q8_0 / q4_0: GGUF; mlx-4bit / mlx-8bit: quantized MLX.")
    ollama: bool = Field(True, description="Write a Modelfile (explicit TEMPLATE and stops) beside each GGUF.")
    mlx_group_size: Literal[32, 64, 128] = 64
    gate: ParityGateConfig | None = Field(ParityGateConfig(), description="null: no gate (GGUF exports unchecked).")
    push: HubPushConfig | None = Field(None, description="Upload every export to the hub; null: keep them local.")

    @property
    def gguf(self) -> list[str]:
        return [f for f in self.formats if f in GGUF_TYPES]

    @property
    def mlx_bits(self) -> list[int]:
        return [int(f.split("-")[1][0]) for f in self.formats if f.startswith("mlx-")]


class ExportRunConfig(_Run, ExportConfig):
    """The `export` flow alone: ship any model dir mlxflow wrote (full, adapters, QLoRA) or a local HF one."""

    name: str = Field("export", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    out_dir: str = Field("runs", description="Stage outputs go to <out_dir>/<name>/<stage>-<key>.")
    model: str = Field(description="The model dir to ship (a checkpoint, adapter dir or local HF model).")
