"""RL iterations: rollouts, the update (GRPO and relatives, PPO), rewards and judges."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from mlxcore.distill.schema import TeacherConfig
from mlxcore.models.layout import is_model_dir
from mlxcore.config.base import ConfigError, _Run, _Strict, _Tracked
from mlxcore.config.bench import BenchConfig, ExportConfig
from mlxcore.config.model import LoRAConfig
from mlxcore.config.stages import PromotionConfig
from mlxcore.config.train import TrainConfig


class RolloutConfig(_Strict):
    """How each RL iteration samples: `prompts` prompts of the train set, `k` completions each."""

    prompts: int = Field(64, gt=0, description="Prompts per iteration (the next ones of a seeded shuffle).")
    k: int = Field(8, ge=2, description="Samples per prompt (the group the advantages compare within).")
    max_tokens: int = Field(256, gt=0)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    prompts_per_batch: int = Field(8, gt=0, description="Prompts whose k samples generate in one batch.")


RL_LOSSES = ("grpo", "dapo", "dr_grpo", "gspo", "rloo", "ppo")


class RLUpdateConfig(_Strict):
    """The update of one iteration: a GRPO-family loss or PPO (mlxcore/rl/objectives.py, ppo.py).

    PPO names as in the MLX-Pretrain seed / TRL: ppo_epochs = `epochs`, ppo_mini_batch_size =
    `batch_size`, clip_range = `clip_eps`."""

    loss: Literal["grpo", "dapo", "dr_grpo", "gspo", "rloo", "ppo"] = Field(
        "grpo", description="grpo | dapo (clip-higher, overlong filter) | dr_grpo (no length/std normalisation) | "
                            "gspo (sequence-level ratio) | rloo (leave-one-out baseline) | ppo (value model, GAE).")
    lr: float = Field(1e-5, gt=0)
    clip_eps: float | None = Field(None, gt=0, lt=1, description="Lower clip range of the importance ratio "
                                                                  "(null: the loss's default, 0.2; gspo 3e-4).")
    clip_eps_high: float | None = Field(None, gt=0, description="Upper clip range (null: the loss's default: "
                                                                 "= clip_eps; dapo 0.28; gspo 4e-4).")
    overlong_filter: bool | None = Field(None, description="Leave truncated samples (hit max_tokens) out of the "
                                                           "loss (null: the loss's default: on for dapo).")
    beta: float = Field(0.0, ge=0, description="KL penalty to the starting policy (GRPO family); 0: no reference is loaded.")
    scale_rewards: bool = Field(True, description="grpo/dapo/gspo: divide advantages by the group's std (False: centre only).")
    batch_size: int = Field(16, gt=0, description="Samples per optimizer step (PPO: ppo_mini_batch_size).")
    epochs: int = Field(1, ge=0, description="Passes over the iteration's buffer (PPO: ppo_epochs); 0: no update "
                                             "(rollout and eval only).")
    grad_clip: float = Field(1.0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0, description="Linear warmup of the iteration's update (the training loop's schedule).")
    min_lr_ratio: float = Field(1.0, ge=0, le=1, description="Cosine floor as a fraction of lr; 1: a constant lr.")
    fine_tune_type: Literal["full", "lora", "dora"] = "full"
    lora: LoRAConfig = LoRAConfig()
    # PPO only
    kl_coef: float = Field(0.05, ge=0, description="PPO: per-token KL penalty to the reference in the reward "
                                                   "(the starting value when kl_target is set).")
    kl_target: float | None = Field(None, gt=0, description="PPO: adapt kl_coef towards this KL per iteration "
                                                            "(Ziegler et al.); null: fixed kl_coef.")
    kl_horizon: float = Field(10000, gt=0, description="PPO: the adaptive KL controller's horizon (samples).")
    vf_coef: float = Field(0.1, ge=0, description="PPO: weight of the value loss.")
    critic_lr: float | None = Field(None, gt=0, description="PPO: the critic's learning rate (null: lr).")
    cliprange_value: float = Field(0.2, gt=0, description="PPO: clip range of the value update.")
    gamma: float = Field(1.0, gt=0, le=1, description="PPO: discount.")
    lam: float = Field(0.95, ge=0, le=1, description="PPO: GAE lambda.")

    def train_config(self, steps: int, seed: int) -> TrainConfig:
        """The training loop's settings for an update of `steps` steps (AdamW, betas 0.9 / 0.999)."""
        return TrainConfig(steps=max(steps, 1), batch_size=self.batch_size, lr=self.lr, warmup_steps=min(self.warmup_steps, max(steps, 1)),
                           min_lr_ratio=self.min_lr_ratio, weight_decay=self.weight_decay, beta2=0.999,
                           grad_clip=self.grad_clip, eval_every=0, save_every=max(steps // 4, 1), keep_last=1,
                           log_every=1, seed=seed, compile=False, fine_tune_type=self.fine_tune_type, lora=self.lora)


class RewardSpec(_Strict):
    """One term of the reward: `weight` x a reward function's value for (prompt, completion, row).

    `name`: a built-in (mlxcore/rl/rewards.py: numeric_match, exact_match, gsm8k_format, format,
    overlong, length, repetition), a function of `rewards_file`, `judge` (the LLM judge) or
    `reward_model` (the learned reward model's score). `args`: keyword arguments for it."""

    name: str = Field(min_length=1)
    weight: float = 1.0
    args: dict[str, Any] = Field(default_factory=dict)


JUDGE_TEMPLATE = ("Rate the assistant's answer to the user's request on a scale of 0 to {max_score}, "
                  "where {max_score} is a fully correct, helpful answer.\n\n"
                  "Request:\n{prompt}\n\n{reference}Answer:\n{completion}\n\n"
                  "Reply with the score only, as a number.")


class JudgeConfig(_Strict):
    """An LLM judge (reward `judge`): the teacher client (Ollama or OpenAI-compatible, with its
    retries and failure budget) asked for a score; the reward is score / max_score (0..1)."""

    teacher: TeacherConfig = Field(default_factory=lambda: TeacherConfig(temperature=0.0, max_tokens=16))
    template: str = Field(JUDGE_TEMPLATE, description="Placeholders: {prompt}, {completion}, {reference} (the "
                                                       "row's `answer`, as 'Reference answer: ...', or empty), {max_score}.")
    max_score: float = Field(10.0, gt=0)
    attempts: int = Field(2, ge=1, description="Asks per completion when the reply holds no score in range.")


class RLDataConfig(_Strict):
    """How rows of `train` / `test` become prompts (and the reference fields rewards see)."""

    format: Literal["auto", "gsm8k", "prompt", "chat"] = Field(
        "auto", description="gsm8k: question + answer ('... #### n'); prompt: a `prompt` column (text or messages) "
                            "plus reference columns; chat: SFT rows (messages/conversations, instruction/output, "
                            "prompt/completion), the last assistant turn is the reference `answer`; auto: by the row.")
    columns: dict[str, str] = Field(default_factory=dict, description="Our field <- your column, e.g. "
                                                                     "{prompt: question, answer: solution}.")


class RLConfig(_Run, _Tracked):
    """RL on any prompt set: every flow run is one iteration (rollout -> update -> eval) continuing the last."""

    name: str = Field("rl", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    out_dir: str = Field("runs", description="State and iterations go to <out_dir>/<name>/.")
    policy: str = Field(description="The starting model: a local model dir (ours, Hugging Face or mlx-lm).")
    train: list[str] = Field(["gsm8k:train"], min_length=1, description="Specs of the prompts to train on.")
    test: list[str] = Field(["gsm8k:test"], min_length=1, description="Specs of the held-out prompts.")
    data: RLDataConfig = RLDataConfig()
    max_download_mb: float = Field(2048, gt=0)
    system_prompt: str | None = Field(
        "Solve the problem step by step, then give the final answer on its own line as '#### <number>'.",
        description="System message of every prompt; null: none.")
    rewards: list[RewardSpec] = Field(default_factory=lambda: [RewardSpec(name="numeric_match")],
                                      description="The reward: the weighted sum of these terms.")
    rewards_file: str | None = Field(None, description="A Python file whose functions are reward names "
                                                       "(fn(prompt, completion, **row) -> float, sync or async).")
    judge: JudgeConfig | None = Field(None, description="The LLM judge for a `judge` reward term.")
    reward_model: str | None = Field(None, description="A reward model dir (the reward-model flow's) for a "
                                                       "`reward_model` term; PPO's critic starts from it.")
    warmup: TrainConfig | None = Field(None, description="SFT on the train split's reference answers before the "
                                                         "first iteration; null: none.")
    rollout: RolloutConfig = RolloutConfig()
    update: RLUpdateConfig = RLUpdateConfig()
    iterations: int = Field(100, gt=0, description="Stop after this many iterations (later runs do nothing).")
    eval_prompts: int = Field(200, ge=0, description="Held-out prompts answered greedily and scored after every iteration.")
    eval_max_tokens: int = Field(256, gt=0)
    seed: int = 0
    bench: BenchConfig | None = Field(None, description="After each iteration: the new policy vs `targets` on the "
                                                        "bench suites; null: skip.")
    schedule_minutes: float | None = Field(None, gt=0, description="Deployments only: start an iteration this often "
                                                                     "(never two at once).")
    export: ExportConfig | None = Field(None, description="Ship the final model (GGUF, Modelfile, MLX 4/8-bit, gate); null: none.")
    promotion: PromotionConfig = Field(PromotionConfig(), description="Champion / challenger: when an iteration's "
                                                                      "policy becomes <run>/model.")

    @model_validator(mode="after")
    def _check(self) -> "RLConfig":
        names = [r.name for r in self.rewards]
        if not names:
            raise ValueError("rewards: name at least one reward term")
        if "judge" in names and self.judge is None:
            raise ValueError("rewards: a `judge` term needs the `judge:` section (the judge's teacher)")
        if "reward_model" in names and self.reward_model is None:
            raise ValueError("rewards: a `reward_model` term needs `reward_model:` (a reward model dir)")
        if self.update.loss == "ppo" and self.update.fine_tune_type != "full":
            raise ValueError("update.loss ppo trains full weights (policy and critic): set update.fine_tune_type full")
        return self

    def check_policy(self) -> None:
        """The policy must exist when a run starts (a deployment may name it before it does)."""
        if not is_model_dir(self.policy, adapters=False):
            raise ConfigError(f"policy: {self.policy!r} is not a local model dir (no config.json); "
                              "set policy=/path/to/model")
