"""The pipelines' configs: pretrain + SFT, fine-tuning, preference training, reward models, distillation."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from mlxcore.distill.schema import PromptConfig, TeacherConfig, VerifyPolicy
from mlxcore.models.layout import is_model_dir
from mlxcore.config.base import _Run, _Strict, _Tracked
from mlxcore.config.bench import BenchConfig, ExportConfig
from mlxcore.config.data import DataConfig, MixSource, SourceConfig, SyntheticConfig, TokenizerConfig
from mlxcore.config.model import ModelConfig
from mlxcore.config.train import SampleConfig, TrainConfig


def _default_sft() -> TrainConfig:
    # packed: 10 packs of 128 positions hold ~27 of the demo's conversations (45 tokens on average),
    # where 32 rows padded to the longest spent ~47% of each step on padding (configs/demo.yaml)
    return TrainConfig(steps=400, batch_size=10, lr=5e-4, warmup_steps=10, eval_every=100, pack="auto")


# The demo's synthetic mixture: copy and sort as before, one share for each other bench suite.
DEMO_TASKS = {"copy": 4.0, "sort": 2.0, "knowledge": 1.0, "qa": 1.0, "math_mcq": 1.0, "logic": 1.0, "json_calc": 1.0}


class PreferenceObjective(_Strict):
    """The preference objective (the losses: mlxcore/preference/losses.py)."""

    name: Literal["dpo", "ipo", "hinge", "simpo", "orpo", "kto"] = Field(
        "dpo", description="dpo / ipo / hinge / kto use reference log-probs (their own cached stage); simpo / orpo none.")
    beta: float = Field(0.1, gt=0, description="dpo/ipo/hinge/kto: how far from the reference; simpo: reward scale; "
                                                "orpo: weight of the odds-ratio term.")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="dpo/simpo: share of pairs taken as mislabelled "
                                                                  "(conservative DPO).")
    gamma: float = Field(0.5, ge=0, description="simpo: the target reward margin.")
    desirable_weight: float = Field(1.0, gt=0, description="kto: weight of desirable rows.")
    undesirable_weight: float = Field(1.0, gt=0, description="kto: weight of undesirable rows.")
    sft_weight: float = Field(0.0, ge=0, description="Add this x the chosen reply's per-token NLL (RPO, TRL's "
                                                     "rpo_alpha); orpo has its own.")


class PreferenceSourceConfig(SourceConfig):
    """Preference files: pairs (prompt/chosen/rejected), chosen/rejected conversations (MiniMind's
    dpo.jsonl, HH, UltraFeedback, OpenAI's preferred_output / non_preferred_output), KTO rows (prompt/completion/label) or scored rows
    (prompt/response/reward). `train`/`val` take the same specs as SFT data (`minimind:dpo`, `hf:`, files)."""

    val_fraction: float = Field(0.05, ge=0, lt=1, description="Train rows held out when val is empty (fixed by row number).")
    val_max_rows: int = Field(500, gt=0, description="At most this many held-out rows.")
    format: Literal["auto", "pairs", "pair-messages", "kto", "scored"] = Field(
        "auto", description="Row schema; auto: detected from each file's first row.")
    reward_field: str = Field("reward", description="scored format: the field holding the reward (else 'score').")
    train: list[str] = Field(min_length=1, description="Specs of the training files.")
    sources: list[MixSource] = Field([], exclude=True, description="Not for preference data (mixtures are for "
                                                                   "data.pretrain / data.sft).")

    @field_validator("sources")
    @classmethod
    def _no_mixture(cls, value: list[MixSource]) -> list[MixSource]:
        if value:
            raise ValueError("weighted mixtures are for data.pretrain / data.sft; preference data takes train / val")
        return value


class SyntheticPairsConfig(_Strict):
    """Preference data drawn from the bench's generators: chosen is the right answer, rejected a near miss."""

    tasks: list[Literal["sort", "copy", "arithmetic"]] = Field(["sort"], min_length=1)
    train_examples: int = Field(2000, gt=0)
    val_examples: int = Field(200, gt=0)
    rows: Literal["pairs", "kto", "scored"] = Field("pairs", description="pairs; kto: each side as a labelled row; "
                                                                          "scored: each side with reward 1 / 0.")
    seed: int = 0


def _default_preference_train() -> TrainConfig:
    return TrainConfig(steps=150, batch_size=16, lr=5e-5, warmup_steps=10, eval_every=50, save_every=50,
                       eval_batches=4, seq_len=128, weight_decay=0.0)


class PreferenceStage(_Strict):
    """Preference training on a fine-tuned model: its data, objective and optimisation."""

    data: PreferenceSourceConfig | None = Field(None, description="Preference files; unset: synthetic pairs "
                                                                  "(pipeline, preference flow) or the distill run's "
                                                                  "own pairs (distill).")
    synthetic: SyntheticPairsConfig = SyntheticPairsConfig()
    objective: PreferenceObjective = PreferenceObjective()
    train: TrainConfig = Field(default_factory=_default_preference_train)
    eval_batch_size: int = Field(16, gt=0, description="Reference log-probs and held-out metrics: examples per batch.")
    pairs_val_fraction: float = Field(0.2, gt=0, lt=1, description="distill's own pairs: the share held out "
                                                                   "(by row number) for the held-out metrics.")

    def max_tokens(self) -> int:
        return self.data.max_tokens if self.data is not None and self.data.max_tokens else self.train.seq_len + 1


class PreferenceRunConfig(_Run, _Tracked, PreferenceStage):
    """The `preference` flow: data -> pretokenize pairs -> reference log-probs -> train -> eval -> bench."""

    name: str = Field("preference", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    out_dir: str = Field("runs", description="Stage outputs go to <out_dir>/<name>/<stage>-<key>.")
    init_from: str = Field(description="The model to align: a local model dir (an SFT'd checkpoint, HF or mlx-lm).")
    max_download_mb: float = Field(2048, gt=0)
    bench: BenchConfig | None = Field(BenchConfig(suites=["sort", "copy"]),
                                      description="The trained model beside the one it started from; null: skip.")
    export: ExportConfig | None = Field(None, description="Ship the final model (GGUF, Modelfile, MLX 4/8-bit, gate); null: none.")


def _default_reward_train() -> TrainConfig:
    return TrainConfig(steps=200, batch_size=16, lr=1e-4, warmup_steps=10, eval_every=50, save_every=50,
                       eval_batches=4, seq_len=128, weight_decay=0.0)


class RewardModelRunConfig(_Run, _Strict):
    """The `reward-model` flow: a scalar-head model on pairs (Bradley-Terry) or scored rows (regression)."""

    name: str = Field("reward-model", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    out_dir: str = Field("runs", description="Stage outputs go to <out_dir>/<name>/<stage>-<key>.")
    init_from: str = Field(description="The decoder to start from: a local model dir (its LM head is not used).")
    data: PreferenceSourceConfig | None = Field(None, description="Pairs or scored rows; unset: synthetic pairs.")
    synthetic: SyntheticPairsConfig = SyntheticPairsConfig()
    train: TrainConfig = Field(default_factory=_default_reward_train)
    margin: float = Field(0.0, ge=0, description="pairs: the margin chosen must beat rejected by.")
    dense_weight: float = Field(0.0, ge=0, description=(
        "pairs: weight of a per-position Bradley-Terry term. At every position after chosen and rejected first "
        "differ, the chosen prefix must score higher, so the head learns to carry a mistake it saw to the last "
        "token it is read at (0: the plain last-token loss)."))
    eval_batch_size: int = Field(16, gt=0)
    max_download_mb: float = Field(2048, gt=0)

    def max_tokens(self) -> int:
        return self.data.max_tokens if self.data is not None and self.data.max_tokens else self.train.seq_len + 1


class PipelineConfig(_Run, _Tracked):
    """The whole DAG: data -> tokenizer -> pretokenize -> pretrain -> sft -> eval -> sample."""

    name: str = Field("demo", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    out_dir: str = Field("runs", description="Stage outputs go to <out_dir>/<name>/<stage>-<key>.")
    data: DataConfig = DataConfig(synthetic=SyntheticConfig(tasks=DEMO_TASKS, sft_examples=16000))  # configs/demo.yaml says why
    # The demo's BPE merges only pairs seen 500+ times: the task words, not the letters of random
    # strings, so a string to copy is the same tokens in the prompt and in the answer.
    tokenizer: TokenizerConfig = TokenizerConfig(min_frequency=500)
    model: ModelConfig = ModelConfig()
    pretrain: TrainConfig = TrainConfig(steps=500)  # the tiny model learns to copy at ~300 steps
    sft: TrainConfig = Field(default_factory=_default_sft)
    sample: SampleConfig = SampleConfig()
    bench: BenchConfig | None = Field(BenchConfig(), description="The last stage: bench suites vs `targets`; null: skip.")
    preference: PreferenceStage | None = Field(None, description="After SFT: preference training (DPO, ...) on "
                                                                  "synthetic pairs or given files; null: none.")
    export: ExportConfig | None = Field(ExportConfig(), description="The final model as GGUF q8_0 (+ Modelfile), "
                                                                   "gated on llama.cpp parity; null: none.")

    @model_validator(mode="after")
    def _check_retention(self) -> "PipelineConfig":
        m = self.model
        if m.arch == "retention":
            if self.pretrain.seq_len % m.retention_chunk:
                raise ValueError(f"model.retention_chunk={m.retention_chunk} does not divide pretrain.seq_len="
                                 f"{self.pretrain.seq_len}: training sequences must be whole chunks")
            if self.sft.pack is True:
                raise ValueError("sft.pack: packed rows need a per-row attention mask, which model.arch=retention "
                                 "does not take; set sft.pack: false (or auto)")
        return self


def _default_finetune() -> TrainConfig:
    return TrainConfig(steps=200, batch_size=16, lr=2e-4, warmup_steps=10, eval_every=100, fine_tune_type="lora")


class FinetuneConfig(_Run, _Tracked):
    """Fine-tune a local Hugging Face / mlx-lm model dir on chat data (its own tokenizer)."""

    name: str = Field("finetune", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    out_dir: str = Field("runs", description="Stage outputs go to <out_dir>/<name>/<stage>-<key>.")
    base_model: str = Field(description="A local model dir (llama / qwen2 / qwen3 ...); no code from it runs.")
    data: DataConfig = DataConfig()
    sft: TrainConfig = Field(default_factory=_default_finetune)
    sample: SampleConfig = SampleConfig()
    export: ExportConfig | None = Field(None, description="Ship the final model (GGUF, Modelfile, MLX 4/8-bit, gate); null: none.")

    @field_validator("base_model")
    @classmethod
    def _is_model_dir(cls, value: str) -> str:
        if not is_model_dir(value, adapters=False):
            raise ValueError(f"{value!r} is not a local model dir (no config.json); set base_model=/path/to/model")
        return value


class PromotionConfig(_Strict):
    """Champion / challenger (mlxcore/tracking/promotion.py): `<run>/model` moves to a new iteration's model only when
    it beats the champion on the same questions (paired bootstrap) and no suite loses more than `tolerance`."""

    enabled: bool = Field(True, description="Gate `<run>/model`; false: every iteration's model is published.")
    metric: Literal["auto", "bench", "eval"] = Field(
        "auto", description="bench: per-question bench correctness; eval: the held-out prompts' accuracy (their "
                            "reward without an accuracy term); auto: bench when `bench` is set, else eval.")
    confidence: float = Field(0.95, gt=0, lt=1, description="Promote only when the lower end of this paired "
                                                            "bootstrap interval of (challenger - champion) is above 0.")
    tolerance: float = Field(0.02, ge=0, description="No suite may lose more than this (accuracy, 0-1) vs the champion.")
    resamples: int = Field(10_000, gt=0)
    start_from: Literal["auto", "latest", "champion"] = Field(
        "latest", description="RL: the policy the next iteration starts from. latest: the last iteration's (the "
                              "gate only decides what `<run>/model` links); auto: the latest, unless it was "
                              "significantly worse than the champion or a suite regressed past `tolerance` (then "
                              "the champion); champion: always the champion.")
    registry_uri: str | None = Field(None, description="MLflow tracking URI whose model registry records each "
                                                       "champion (alias `champion`); null: $MLFLOW_TRACKING_URI or none.")
    registry_model: str | None = Field(None, description="The registered model's name (null: the run's name).")


class StreamConfig(_Strict):
    """How the student trains on rows while they are still being generated."""

    val_rows: int = Field(32, ge=1, description="The first N rows are held out for evaluation.")
    cold_start_rows: int = Field(64, ge=1, description="Training starts once this many train rows exist.")
    epochs: float = Field(2.0, gt=0, description="Passes over the rows: paces training while generation runs "
                                                 "and plans the step count.")
    poll_s: float = Field(0.5, gt=0, description="How often to look for new rows while waiting.")
    stall_timeout_s: float = Field(900, gt=0, description="Give up when no row arrives for this long.")


class StudentConfig(_Strict):
    """The model distillation trains: a fresh one (`model` preset + a tokenizer) or `init_from`."""

    init_from: str | None = Field(None, description="A local model dir (ours, Hugging Face or mlx-lm) to start "
                                                    "from; its tokenizer is used. Unset: a fresh `model`.")
    model: ModelConfig = ModelConfig()
    tokenizer: TokenizerConfig = Field(
        default_factory=lambda: TokenizerConfig(vocab_size=2048),
        description="A fresh student's tokenizer: a local dir, or a BPE trained on the prompt stream.")

    @field_validator("init_from")
    @classmethod
    def _is_model_dir(cls, value: str | None) -> str | None:
        if value is not None and not is_model_dir(value, adapters=False):
            raise ValueError(f"{value!r} is not a local model dir (no config.json)")
        return value


def _default_distill_train() -> TrainConfig:
    return TrainConfig(steps=2000, batch_size=8, seq_len=512, lr=5e-4, warmup_steps=20, eval_every=50,
                       save_every=50, log_every=5)


class DistillConfig(_Run, _Tracked):
    """A teacher writes verified SFT rows while the student trains on the growing file.

    `train.steps` is the most steps; the run plans `stream.epochs` passes over `target_rows`.
    """

    name: str = Field("distill", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    out_dir: str = Field("runs", description="Stage outputs go to <out_dir>/<name>/<stage>-<key>.")
    teacher: TeacherConfig = TeacherConfig()
    prompts: PromptConfig = PromptConfig()
    verify: VerifyPolicy = VerifyPolicy()
    target_rows: int = Field(2000, gt=0, description="Verified rows to generate.")
    max_prompts: int | None = Field(None, gt=0, description="Prompts to try at most; default 20 x target_rows.")
    student: StudentConfig = StudentConfig()
    train: TrainConfig = Field(default_factory=_default_distill_train)
    stream: StreamConfig = StreamConfig()
    sample: SampleConfig = Field(default_factory=lambda: SampleConfig(num_prompts=8, max_tokens=128))
    bench: BenchConfig | None = Field(BenchConfig(), description="The last stage: the student vs the teacher and "
                                                               "`targets` on the bench suites; null: skip.")
    preference: PreferenceStage | None = Field(None, description="After the student: preference training on the "
                                                                  "teacher's verified right vs wrong replies (pairs.jsonl) "
                                                                  "or on `preference.data`; null: none.")
    export: ExportConfig | None = Field(None, description="Ship the final model (GGUF, Modelfile, MLX 4/8-bit, gate); null: none.")
    promotion: PromotionConfig = Field(PromotionConfig(), description="Champion / challenger: when a run's student "
                                                                      "becomes <run>/model.")

    @model_validator(mode="after")
    def _check(self) -> "DistillConfig":
        if self.train.fine_tune_type != "full" and self.student.init_from is None:
            raise ValueError(f"train.fine_tune_type {self.train.fine_tune_type} trains adapters on a base model: "
                             "set student.init_from")
        if self.target_rows <= self.stream.val_rows:
            raise ValueError(f"target_rows={self.target_rows} leaves no training rows after stream.val_rows="
                             f"{self.stream.val_rows}")
        if self.train.world_size != 1:
            raise ValueError("distillation trains on one process: train.world_size must be 1")
        return self
