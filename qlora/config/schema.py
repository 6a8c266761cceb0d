"""The job schema: one YAML file describes a fine-tuning job.

These pydantic models ARE the documentation of every key (each field's docstring is its one
line of help, repeated as comments in configs/*.yaml). Validation is strict: unknown keys,
wrong types and bad enum values are errors that name the key. No torch imports here, so the
CLI can validate a job on any machine.

Reading a YAML file into these models (overrides, relative paths) is qlora.config.loading.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from qlora.sizes import parse_bytes

DATA_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")

DataFormat = Literal["auto", "alpaca", "chat", "text", "preference"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


class ModelSection(_Strict):
    name_or_path: str
    """Base model: a local Hugging Face model folder, or a hub id (needs the hub or a warm cache)."""
    revision: Optional[str] = None
    """Hub revision (branch, tag or commit) of the base model; ignored for local folders."""
    trust_remote_code: bool = False
    """Run Python code shipped with the model. Off unless you trust its author."""
    init: Literal["pretrained", "random"] = "pretrained"
    """pretrained: load the weights; random: only config.json is read and random weights are
    quantized one linear at a time (memory/speed proofs)."""
    tokenizer: Optional[str] = None
    """Tokenizer folder when name_or_path has none (e.g. init random with configs/arch/<name>);
    default: name_or_path."""
    adapter: Optional[str] = None
    """Start from this trained LoRA adapter folder (PEFT format, e.g. the SFT adapter before DPO)
    instead of a fresh one: its rank, alpha and target modules are the job's, and it trains on."""
    reference_adapter: Optional[str] = None
    """train.objective dpo: the reference is the base with this frozen adapter (e.g. the SFT
    adapter model.adapter starts from); default: the base with the trained adapter switched off."""


class QuantizationSection(_Strict):
    bits: Optional[Literal[4, 8]] = 4
    """Base weights: 4 = QLoRA (NF4/FP4), 8 = LLM.int8, none = plain 16-bit LoRA."""
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type; nf4 (NormalFloat) is the QLoRA choice."""
    double_quant: bool = True
    """Quantize the quantization constants too (saves ~0.37 bits/param)."""
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """Dtype of the base's matmuls and of the LoRA update (autocast on a GPU); LoRA weights and grads stay float32."""

    @field_validator("bits", mode="before")
    @classmethod
    def _none_string(cls, value: Any) -> Any:
        return None if isinstance(value, str) and value.lower() == "none" else value

    def describe(self, compute: bool = True) -> str:
        """As the job prints it ("NF4 + double quant, compute bfloat16"); compute=False: the
        weights' format alone ("4-bit nf4", "8-bit", "16-bit"), all an adapter's fit depends on."""
        if not compute:
            return {4: f"4-bit {self.quant_type}", 8: "8-bit"}.get(self.bits, "16-bit")
        if self.bits == 4:
            double = " + double quant" if self.double_quant else ""
            return f"{self.quant_type.upper()}{double}, compute {self.compute_dtype}"
        if self.bits == 8:
            return f"LLM.int8, compute {self.compute_dtype}"
        return f"unquantized {self.compute_dtype}"


class LoraSection(_Strict):
    r: int = Field(16, gt=0)
    """LoRA rank."""
    alpha: float = Field(32.0, gt=0)
    """LoRA scale numerator: the update is (alpha / r) * B A (alpha / sqrt(r) with rslora)."""
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    """Dropout on the LoRA input."""
    target_modules: Union[Literal["all-linear"], list[str]] = "all-linear"
    """Which linear layers get adapters: all-linear (every linear layer but the output head) or a
    list of module names."""
    use_rslora: bool = False
    """Rank-stabilized LoRA scaling alpha / sqrt(r)."""
    use_dora: bool = False
    """Weight-decomposed LoRA (DoRA): slower, sometimes better."""


class DataSource(_Strict):
    path: str
    """A .jsonl/.json/.parquet/.csv file, or the name of a dataset in the local datasets cache."""
    format: DataFormat = "auto"
    """Row format of this source; auto takes data.format, which may itself be auto (detected from the keys)."""


class DataSection(_Strict):
    train: Union[str, list[DataSource]]
    """Training data: a path, or a list of {path, format}."""
    eval: Optional[str] = None
    """Held-out data (a path); or use eval_fraction."""
    eval_fraction: Optional[float] = Field(None, gt=0.0, lt=1.0)
    """Fraction of the training rows held out for evaluation (when data.eval is not given)."""
    format: DataFormat = "auto"
    """alpaca (instruction, input, output), chat (messages), text (text), preference ([prompt,] chosen,
    rejected: for train.objective dpo and orpo), or auto (detected from the keys)."""
    max_seq_len: int = Field(2048, gt=0)
    """Longest sequence in tokens; longer rows are handled by too_long."""
    packing: bool = False
    """Pack several rows into each sequence (no attention across rows; position ids restart per row)."""
    padding_free: bool = True
    """Concatenate each micro-batch's rows into one sequence (no padding, no attention across rows,
    same rows per step): the padded loss, less compute; false pads each micro-batch instead."""
    train_on: Literal["completions", "all"] = "completions"
    """completions: loss on answers only (prompts masked); all: loss on every token."""
    too_long: Literal["truncate", "drop"] = "truncate"
    """What to do with rows longer than max_seq_len."""

    @model_validator(mode="after")
    def _one_eval_source(self) -> "DataSection":
        if self.eval is not None and self.eval_fraction is not None:
            raise ValueError("data.eval and data.eval_fraction: set one, not both")
        return self

    def sources(self) -> list[DataSource]:
        """Training sources as a list, each with its effective format."""
        if isinstance(self.train, str):
            return [DataSource(path=self.train, format=self.format)]
        return [
            DataSource(path=source.path, format=self.format if source.format == "auto" else source.format)
            for source in self.train
        ]


class TrainSection(_Strict):
    max_steps: Optional[int] = Field(None, gt=0)
    """Number of optimizer steps; set this or epochs."""
    epochs: Optional[float] = Field(None, gt=0)
    """Passes over the training data (fractions allowed); default 1 when max_steps is not set. An
    epoch's last step takes the micro-batches it has left, so each row trains once per epoch."""
    micro_batch_size: Union[Annotated[int, Field(gt=0)], Literal["auto"]] = 1
    """Sequences per forward pass; auto: the largest that `qlora plan` says fits (grad_accum_steps
    then keeps effective_batch_size)."""
    grad_accum_steps: int = Field(1, gt=0)
    """Micro-batches per optimizer step; effective batch = micro_batch_size * grad_accum_steps."""
    effective_batch_size: Optional[int] = Field(None, gt=0)
    """Sequences per optimizer step kept when micro_batch_size is auto; default: grad_accum_steps."""
    memory_budget: Optional[Union[int, str]] = None
    """Memory micro_batch_size auto and gradient_checkpointing auto plan for, e.g. 24GiB; default: the
    CUDA device's total memory; on CPU micro_batch_size auto needs it, gradient_checkpointing auto takes the
    available RAM."""
    learning_rate: float = Field(2e-4, gt=0)
    """Peak learning rate."""
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warmup from 0 to learning_rate over this many optimizer steps."""
    optimizer: Literal["paged_adamw_8bit", "adamw_8bit", "adamw"] = "paged_adamw_8bit"
    """bitsandbytes paged/8-bit AdamW (QLoRA's choice) or torch AdamW."""
    weight_decay: float = Field(0.0, ge=0)
    """Decoupled weight decay on the LoRA weights."""
    max_grad_norm: Optional[float] = Field(1.0, gt=0)
    """Clip the global gradient norm to this; none disables clipping."""
    gradient_checkpointing: Union[bool, Literal["selective", "auto"]] = "auto"
    """Recompute activations in the backward pass: true: far less memory, ~30% more compute;
    selective: keep the 4-bit matmuls' outputs and recompute only the rest (faster, more memory;
    needs quantization.bits 4); false: none; auto: the fastest of these that the plan fits in
    train.memory_budget (chosen at the micro-batch, 1 when auto, before the model loads; a resumed
    run keeps its checkpoint's; see `qlora plan`)."""
    offload_activations: bool = False
    """Keep the tensors saved for backward in host memory (CUDA: pinned, copied back in backward):
    less GPU memory for long sequences, more transfer time; no effect on CPU."""
    loss_chunk_tokens: Union[Annotated[int, Field(gt=0)], Literal["auto", "off"]] = "auto"
    """Supervised positions whose vocabulary-sized logits the loss computes at once (chunks
    recomputed in backward); auto: one chunk's float32 logits within 256 MiB (523 tokens for a 128k
    vocabulary); off: all of a micro-batch's at once."""
    seed: int = 42
    """Seed for LoRA init, dropout and data order."""
    distributed: Literal["ddp", "fsdp"] = "ddp"
    """Under torchrun / accelerate launch with N processes: ddp copies the base to every GPU and
    splits each step's micro-batches; fsdp shards the frozen 4-bit base (and the adapters) across
    the GPUs, for a base that does not fit one (needs quantization.bits 4 or none)."""
    eval_every: Optional[int] = Field(None, ge=0)
    """Evaluate every N optimizer steps (and always at the end when there is eval data); needs
    data.eval or data.eval_fraction; 0 or null: only at the end."""
    save_every: Optional[int] = Field(None, ge=0)
    """Write a checkpoint every N optimizer steps; 0 or null: none (a stop request still writes one)."""
    keep_checkpoints: int = Field(2, gt=0)
    """How many recent checkpoints to keep."""
    log_every: int = Field(1, gt=0)
    """Show loss, eval loss and tokens/s every N optimizer steps: the bar on a terminal, a plain
    line elsewhere (metrics.jsonl gets every step)."""
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = []
    """Experiment trackers that also get every metrics.jsonl row, the resolved config and the adapter
    path: tensorboard (OUTPUT/tensorboard/), mlflow (MLFLOW_TRACKING_URI, else OUTPUT/mlruns/), wandb
    (WANDB_PROJECT, WANDB_MODE ...); none or [] for none."""
    eval_exact_match: int = Field(0, ge=0)
    """Greedy-decode this many held-out prompts before and after training and report exact match of the
    answers (preference rows: with the chosen answer)."""
    eval_max_new_tokens: int = Field(64, gt=0)
    """Longest answer generated for eval_exact_match."""
    objective: Literal["sft", "dpo", "orpo"] = "sft"
    """sft: next-token loss on the answers; dpo: preference pairs against a reference (no grad: the
    base with the adapter switched off, or model.reference_adapter); orpo: the odds-ratio loss plus
    the chosen answer's NLL, no reference."""
    dpo_beta: float = Field(0.1, gt=0)
    """DPO's beta: how far the adapter may move from the reference (rewards are beta x log-ratio); IPO's tau."""
    dpo_label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)
    """Conservative DPO: the probability that a pair's preference is flipped (sigmoid loss only)."""
    dpo_loss: Literal["sigmoid", "ipo"] = "sigmoid"
    """sigmoid: -log sigmoid(beta x margin); ipo: (per-token margin - 1 / (2 beta))^2."""
    orpo_lambda: float = Field(0.1, gt=0)
    """Weight of ORPO's odds-ratio term next to the chosen answer's NLL (TRL's ORPOConfig.beta)."""

    @field_validator("memory_budget")
    @classmethod
    def _size(cls, value: Optional[Union[int, str]]) -> Optional[Union[int, str]]:
        if value is not None:
            try:
                parse_bytes(str(value))
            except ValueError as error:
                raise ValueError(f"train.memory_budget: {error}") from None
        return value

    @field_validator("gradient_checkpointing", mode="before")
    @classmethod
    def _checkpointing_mode(cls, value: Any) -> Any:
        # One message for the union (bool, "selective" or "auto") instead of one per member.
        allowed = {"auto", "selective", "true", "false", "yes", "no", "on", "off", "1", "0"}
        if not isinstance(value, bool) and str(value).strip().lower() not in allowed:
            raise ValueError(f"train.gradient_checkpointing: expected auto, true, false or selective (got {value!r})")
        return value

    @field_validator("eval_every", "save_every")
    @classmethod
    def _zero_is_off(cls, value: Optional[int]) -> Optional[int]:
        return value or None  # users write 0 for off: the same as null

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> "TrainSection":
        if self.max_steps is not None and self.epochs is not None:
            raise ValueError("train.max_steps and train.epochs: set one, not both")
        return self

    @field_validator("report_to", mode="before")
    @classmethod
    def _trackers(cls, value: Any) -> Any:
        # `none`, a bare name and a repeated name read as users mean them.
        names = [] if value is None or value == "none" else [value] if isinstance(value, str) else value
        if not isinstance(names, list):
            return value
        allowed = ("tensorboard", "mlflow", "wandb")
        for name in names:
            if name not in allowed:
                raise ValueError(f"train.report_to: expected any of {', '.join(allowed)} or none (got {name!r})")
        return list(dict.fromkeys(names))

    @field_validator("loss_chunk_tokens", mode="before")
    @classmethod
    def _chunk(cls, value):
        if value is False:  # YAML reads a bare `off` as false
            return "off"
        if value in ("auto", "off") or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            return value
        raise ValueError(
            f"train.loss_chunk_tokens: a positive number of supervised positions, auto or off (got {value!r})"
        )


class OutputSection(_Strict):
    dir: str
    """Where the adapter, tokenizer, resolved config and metrics.jsonl are written."""


class JobConfig(_Strict):
    model: ModelSection
    """The frozen base model."""
    quantization: QuantizationSection = QuantizationSection()
    """How the base weights are stored and computed."""
    lora: LoraSection = LoraSection()
    """The trainable adapters."""
    data: DataSection
    """Training and evaluation rows and how they become token sequences."""
    train: TrainSection = TrainSection()
    """The optimization loop."""
    output: OutputSection
    """Where the results go."""

    @model_validator(mode="after")
    def _selective_needs_4bit(self) -> "JobConfig":
        # The selective policy recognises bitsandbytes' 4-bit matmul op; other bases never dispatch it.
        if self.train.gradient_checkpointing == "selective" and self.quantization.bits != 4:
            raise ValueError(
                "train.gradient_checkpointing: selective keeps the 4-bit matmuls' outputs; "
                f"it needs quantization.bits: 4 (got {self.quantization.bits})"
            )
        if self.train.eval_every and self.data.eval is None and self.data.eval_fraction is None:
            raise ValueError(
                f"train.eval_every: {self.train.eval_every} needs eval data; set data.eval or data.eval_fraction "
                "(or remove train.eval_every)"
            )
        if self.train.objective != "sft":
            preference_limits(self)
        if self.model.reference_adapter is not None and self.train.objective != "dpo":
            raise ValueError(
                "model.reference_adapter: only train.objective dpo has a reference "
                f"(this job is {self.train.objective})"
            )
        if self.train.distributed == "fsdp" and self.quantization.bits == 8:
            # bitsandbytes' 8-bit weights keep int8 data and row statistics FSDP cannot flatten.
            raise ValueError(
                "train.distributed: fsdp shards 4-bit or 16-bit bases; quantization.bits 8 is not supported"
            )
        return self


def preference_limits(config: JobConfig) -> None:
    """What a dpo / orpo job does not do (yet): each a one-line refusal naming the key."""
    objective, train = config.train.objective, config.train
    if config.data.packing:
        raise ValueError(f"data.packing: {objective} pairs are not packed; set data.packing: false")
    if not config.data.padding_free:
        raise ValueError(f"data.padding_free: {objective} batches are padding-free only; set data.padding_free: true")
    if config.data.train_on != "completions":
        raise ValueError(f"data.train_on: {objective} scores the answers only; set data.train_on: completions")
    if train.dpo_label_smoothing and train.dpo_loss != "sigmoid":
        raise ValueError("train.dpo_label_smoothing: applies to dpo_loss sigmoid only")
