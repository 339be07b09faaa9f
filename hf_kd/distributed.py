"""`DistillationTrainer` under accelerate's backends: one process, DDP (GPU or CPU processes), FSDP, DeepSpeed.

`transformers.Trainer` distributes the student. What it does not know about lives here:

- the teacher is frozen, so it is never wrapped for gradients: a full copy per process under DDP and
  DeepSpeed ZeRO-1/2; partitioned by an inference-only DeepSpeed engine under ZeRO-3; sharded with
  ``fully_shard`` under FSDP (`place_teacher`);
- the projections (student width -> teacher width) are trained but live outside the DDP-wrapped student,
  so their gradients are averaged here (`average_gradients`);
- a decision taken on one process (a refused input, a non-finite loss) must be taken by every process,
  or the others wait in their next collective until the timeout (`gather_messages`, `any_process`);
- combinations known not to work are refused before training (`launch_problem`, `backend_problems`).

Every FSDP and DeepSpeed path sits behind `Backend.kind`. The CPU tests run one process and DDP over gloo
(``tests/test_distributed.py``) and shard a teacher with `shard_teacher` over gloo; the FSDP and DeepSpeed
trainer paths need GPUs (accelerate runs neither on CPU processes).
"""

from __future__ import annotations

import atexit
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
from accelerate.utils import DistributedType
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

SINGLE, DDP, FSDP, DEEPSPEED, UNSUPPORTED = "single", "ddp", "fsdp", "deepspeed", "unsupported"
MULTI_CPU_CONFIG = "recipes/accelerate/multi_cpu.yml"


@dataclass(frozen=True)
class Backend:
    """How this run is distributed, as far as the teacher and the projections are concerned."""

    kind: str  # SINGLE, DDP, FSDP, DEEPSPEED or UNSUPPORTED
    world_size: int = 1
    distributed_type: str = "NO"  # accelerate's name, for messages
    zero_stage: int | None = None  # DeepSpeed
    fsdp_version: int | None = None  # FSDP

    @property
    def shards_models(self) -> bool:
        """Weights are split over processes: a forward pass needs every process, never the main one alone."""
        return self.kind == FSDP or (self.kind == DEEPSPEED and self.zero_stage == 3)

    @property
    def name(self) -> str:
        if self.kind == DEEPSPEED:
            return f"DeepSpeed ZeRO-{self.zero_stage}"
        if self.kind == FSDP:
            return f"FSDP{self.fsdp_version or 1}"
        return {SINGLE: "one process", DDP: f"DDP ({self.distributed_type})"}.get(self.kind, self.distributed_type)


def backend_of(accelerator) -> Backend:
    dtype = accelerator.distributed_type
    common = {"world_size": accelerator.num_processes, "distributed_type": str(dtype).split(".")[-1]}
    if dtype == DistributedType.DEEPSPEED:
        return Backend(DEEPSPEED, zero_stage=int(accelerator.state.deepspeed_plugin.zero_stage), **common)
    if dtype == DistributedType.FSDP:
        return Backend(FSDP, fsdp_version=int(getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1)), **common)
    if dtype == DistributedType.NO:
        return Backend(SINGLE, **common)
    if dtype in (DistributedType.XLA, DistributedType.MEGATRON_LM):
        return Backend(UNSUPPORTED, **common)
    return Backend(DDP, **common)  # MULTI_GPU, MULTI_CPU, MULTI_XPU, MULTI_NPU, ...: the student is DDP-wrapped


PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def run_precision(accelerator) -> str:
    """"bf16", "fp16" or "no": the run's mixed precision (under DeepSpeed, what its config enables)."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        config = accelerator.state.deepspeed_plugin.deepspeed_config
        for name in ("bf16", "fp16"):
            if (config.get(name) or {}).get("enabled") is True:
                return name
        return "no"
    precision = str(accelerator.mixed_precision)
    return precision if precision in PRECISION_DTYPES else "no"


# ---------------------------------------------------------------------------- refusals
def launch_problem(world_size: int) -> str | None:
    """A launcher started several processes but Trainer runs each alone (no GPU for it, use_cpu off).

    Each process would then train on all the data by itself and write the same output_dir: refuse.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if launched > 1 and world_size == 1:
        return (
            f"this process was started as one of {launched} (WORLD_SIZE={launched}), but Trainer runs it alone "
            "(without GPUs, accelerate joins CPU processes only with use_cpu), so every process would train on all "
            "the data by itself and write the same output_dir. On a machine without GPUs add --use_cpu true (e.g. "
            f"accelerate launch --config_file {MULTI_CPU_CONFIG} -m hf_kd.cli distill --config RECIPE --use_cpu "
            "true); with GPUs, check that each process sees one (CUDA_VISIBLE_DEVICES)."
        )
    return None


def single_cpu_launch_hint(world_size: int) -> str | None:
    """`accelerate launch --cpu --num_processes N` starts one process (its CPU launcher uses mpirun for more)."""
    cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    if world_size == 1 and cpu and "MASTER_PORT" in os.environ and "WORLD_SIZE" not in os.environ:
        return (
            "accelerate launch --cpu started ONE process, whatever --num_processes says (accelerate starts several "
            f"CPU processes only through mpirun). For several CPU processes use: accelerate launch --config_file "
            f"{MULTI_CPU_CONFIG} -m hf_kd.cli distill --config RECIPE --use_cpu true"
        )
    return None


def backend_problems(backend: Backend, accelerator, args, projections: int) -> list[str]:
    """Combinations known not to work, each with its fix; checked before anything is written or trained."""
    problems = []
    if backend.kind == UNSUPPORTED:
        problems.append(
            f"accelerate's {backend.distributed_type} backend is not supported by hf_kd; use one process, DDP "
            "(several GPUs or CPU processes), FSDP or DeepSpeed (see recipes/accelerate/)."
        )
    if projections and backend.kind in (FSDP, DEEPSPEED):
        why = (
            "FSDP2 swaps the optimizer's parameters for the sharded ones and fails on parameters outside the model"
            if backend.kind == FSDP
            else "DeepSpeed partitions and reduces only what its engine owns, and an optimizer named in its config "
            "would not train them at all"
        )
        problems.append(
            f"the student is narrower than the teacher and hidden_weight > 0, so {projections} learned projection(s) "
            f"train next to the student, outside the model {backend.name} manages ({why}). Use DDP "
            "(recipes/accelerate/ddp.yml), a student of the teacher's hidden size (e.g. student_layers), or "
            "hidden_weight=0."
        )
    if backend.kind == DEEPSPEED:
        plugin = accelerator.state.deepspeed_plugin
        if backend.zero_stage == 3 and not plugin.zero3_save_16bit_model:
            problems.append(
                "DeepSpeed ZeRO-3 without zero3_save_16bit_model (stage3_gather_16bit_weights_on_model_save) saves "
                "the student as partitioned DeepSpeed files, not a folder from_pretrained can load. Set "
                "zero3_save_16bit_model: true in the accelerate config (recipes/accelerate/zero3.yml does)."
            )
        engine_dtype = {"bf16": "bfloat16", "fp16": "float16"}.get(run_precision(accelerator), "float32")
        if backend.zero_stage == 3 and args.teacher_dtype not in ("auto", engine_dtype):
            problems.append(
                f"teacher_dtype={args.teacher_dtype} under DeepSpeed ZeRO-3: the teacher's engine runs in the run's "
                f"precision ({engine_dtype}). Leave teacher_dtype=auto, or change mixed_precision."
            )
    if backend.kind == FSDP:
        state_dict_type = str(getattr(accelerator.state.fsdp_plugin, "state_dict_type", ""))
        if "SHARDED" in state_dict_type:
            problems.append(
                f"FSDP with {state_dict_type.split('.')[-1]} saves no model.safetensors, so the student could not "
                "be loaded with from_pretrained. Set fsdp_state_dict_type: FULL_STATE_DICT (recipes/accelerate/"
                "fsdp.yml does)."
            )
    return problems


# ---------------------------------------------------------------------------- collectives
def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


_END_AT_EXIT: list[bool] = []


def _end_process_group() -> None:
    if not _initialized():  # ended by the user's code, or never formed
        return
    torch.distributed.destroy_process_group()
    # The group itself outlives this (DDP's reducer holds it), and so do its worker threads. A worker that ran the
    # last collective drops its work object after the caller has moved on, and dropping the work's tensors takes the
    # GIL. If the interpreter is finalizing by then, the thread is ended inside C++ and the process aborts. Sleeping
    # releases the GIL, so such a worker finishes now, while the interpreter is alive.
    time.sleep(0.2)


def end_process_group_at_exit() -> None:
    """At interpreter exit, destroy the default process group and let gloo's workers finish what they hold.

    accelerate creates the group and Trainer never ends it. Left to interpreter teardown, a gloo worker still holding
    the last collective's tensors aborts a finished run ("terminate called without an active exception", exit code
    -6; a third of two-process CPU launches here), so the launcher reports a failure. Registered once per process;
    `atexit` runs before the interpreter finalizes.
    """
    if not _END_AT_EXIT:
        _END_AT_EXIT.append(True)
        atexit.register(_end_process_group)


def gather_messages(message: str | None, world_size: int) -> list[str | None]:
    """Every process's message (None = nothing to report), in rank order; collective when world_size > 1."""
    if world_size <= 1 or not _initialized():
        return [message]
    messages: list[str | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(messages, message)
    return messages


def sum_over_processes(tensor: torch.Tensor, accelerator) -> torch.Tensor:
    if accelerator.num_processes <= 1:
        return tensor
    return accelerator.reduce(tensor, "sum")


def any_process(flag: bool, accelerator) -> bool:
    """True on every process when `flag` is True on at least one: one scalar all-reduce."""
    value = torch.tensor(float(flag), device=accelerator.device)
    return bool(sum_over_processes(value, accelerator).item() > 0)


def average_gradients(params: Iterable[nn.Parameter], accelerator) -> None:
    """Average the gradients of parameters that no DDP wrapper reduces, in one all-reduce.

    Each process's loss is scaled by the world size (its normalisers count every process's items), so the
    average over processes is the gradient of the loss over the whole batch, as DDP gives the student. A
    missing gradient (no backward reached it on this process) counts as zero, so every process takes part.
    """
    params = [p for p in params if p.requires_grad]
    if accelerator.num_processes <= 1 or not params:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params])
    flat = accelerator.reduce(flat, "mean")
    offset = 0
    for p in params:
        grad = flat[offset : offset + p.numel()].view_as(p).to(p.dtype)
        offset += p.numel()
        if p.grad is None:
            p.grad = grad.clone()
        else:
            p.grad.copy_(grad)


# ---------------------------------------------------------------------------- the teacher
def is_partitioned(model: nn.Module) -> bool:
    """The weights were partitioned by DeepSpeed ZeRO-3 (e.g. loaded under its zero.Init)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


class GatheredState(Mapping):
    """A ZeRO-3-partitioned model's state dict whose parameters are gathered one at a time, when read.

    Lets `hf_kd.hub.weights_sha256` hash a partitioned teacher without holding it whole on one device.
    Reading a parameter is collective: every process must read the same names in the same order.
    """

    def __init__(self, model: nn.Module):
        self._state = model.state_dict()
        self._params = dict(model.named_parameters(remove_duplicate=False))

    def __getitem__(self, name: str) -> torch.Tensor:
        param = self._params.get(name)
        if param is None or not hasattr(param, "ds_id"):
            return self._state[name]
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            return param.detach().to("cpu", copy=True)

    def __iter__(self) -> Iterator[str]:
        return iter(self._state)

    def __len__(self) -> int:
        return len(self._state)


def teacher_deepspeed_config(student_config: Mapping, *, mixed_precision: str, micro_batch: int, hidden_size: int) -> dict:
    """The DeepSpeed config of an inference-only ZeRO-3 engine for the teacher, from the student's config.

    No optimizer, scheduler or gradient settings (the teacher has none); ZeRO-3 partitions its weights over
    the processes, with the student's parameter offload (CPU or NVMe) when the student has one. Values left
    "auto" in the student's config are not copied: accelerate fills them for the student's engine only.
    """
    zero = dict(student_config.get("zero_optimization") or {})
    offload = {k: v for k, v in dict(zero.get("offload_param") or {}).items() if v != "auto" and v is not None}
    teacher_zero = {
        "stage": 3,
        # As accelerate sizes them for a model of this width when the config says "auto".
        "stage3_param_persistence_threshold": 10 * hidden_size,
        "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
    }
    if offload.get("device", "none") != "none":
        teacher_zero["offload_param"] = offload
    return {
        "train_micro_batch_size_per_gpu": int(micro_batch),
        "gradient_accumulation_steps": 1,
        "zero_optimization": teacher_zero,
        "bf16": {"enabled": mixed_precision == "bf16"},
        "fp16": {"enabled": mixed_precision == "fp16"},
        "steps_per_print": 2**31 - 1,  # no DeepSpeed progress lines for a model that never steps
    }


def shard_teacher(teacher: nn.Module, *, device_type: str, offload: bool = False, param_dtype=None) -> nn.Module:
    """Shard a frozen teacher over all processes with FSDP2's ``fully_shard``, for forward passes only.

    Each transformer block (the classes in ``_no_split_modules`` held in an ``nn.ModuleList``) becomes its own
    unit, gathered just before its forward pass and freed after it, so a process never holds the whole
    teacher; the rest (embeddings, head, tied weights) forms the root unit. ``param_dtype`` gathers the weights
    in that dtype (bf16/fp16 mixed precision); ``offload`` keeps the shards in CPU memory. Collective: every
    process calls it, and then runs every teacher forward pass.
    """
    mesh = init_device_mesh(device_type, (torch.distributed.get_world_size(),))
    kwargs = {"mesh": mesh, "reshard_after_forward": True}
    if offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    if param_dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype)
    blocks = set(getattr(teacher, "_no_split_modules", None) or [])
    for module in list(teacher.modules()):
        if isinstance(module, nn.ModuleList):
            for child in module:
                if type(child).__name__ in blocks:
                    fully_shard(child, **kwargs)
    fully_shard(teacher, **kwargs)
    return teacher.eval()


def place_teacher(teacher: nn.Module, backend: Backend, accelerator, args, dtype) -> nn.Module:
    """Put the frozen teacher where `backend` wants it; return what the forward passes call.

    - one process, DDP, DeepSpeed ZeRO-1/2: a full copy on this process's device, in `dtype`, not wrapped (it
      has no gradients to reduce). ZeRO-1/2 partition optimizer state and gradients, which a teacher has none of;
    - DeepSpeed ZeRO-3: an inference-only DeepSpeed engine partitions it over the processes (returned; the
      module itself stays `trainer.teacher`), so a teacher larger than one device fits;
    - FSDP: sharded with `shard_teacher`, in evaluation mode.
    Mixed precision reaches the teacher too: the ZeRO-3 engine runs in bf16/fp16, FSDP gathers in it, and under
    DDP and FSDP the forward pass runs in accelerate's autocast (`DistillationTrainer.compute_loss`).
    """
    if backend.kind == DEEPSPEED and backend.zero_stage == 3:
        import deepspeed

        plugin = accelerator.state.deepspeed_plugin
        config = teacher_deepspeed_config(
            plugin.deepspeed_config,
            mixed_precision=run_precision(accelerator),
            micro_batch=args.per_device_train_batch_size,
            hidden_size=teacher.config.get_text_config().hidden_size,
        )
        engine, *_ = deepspeed.initialize(model=teacher, config=config)
        engine.eval()
        return engine
    if backend.kind == FSDP:
        plugin = accelerator.state.fsdp_plugin
        offload = getattr(plugin, "cpu_offload", None)
        offload = bool(getattr(offload, "offload_params", False)) or type(offload).__name__ == "CPUOffloadPolicy"
        half = PRECISION_DTYPES.get(run_precision(accelerator))
        if dtype is not None:
            teacher.to(dtype=dtype)
        if not offload:
            teacher.to(accelerator.device)
        return shard_teacher(teacher, device_type=accelerator.device.type, offload=offload, param_dtype=half)
    teacher.to(device=accelerator.device, dtype=dtype)
    return teacher
