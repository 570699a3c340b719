"""Post-training interventions and the norms of the weights they leave (figure F1, claim 1).

One run trains a model with one intervention and records, every ``record_every`` optimizer steps,
the Frobenius norm of every weight matrix of every decoder layer (the (layer, matrix type) grid of
the architecture spec), how far each matrix moved from its start, the training loss of every step,
and held-out measurements every ``eval_every`` steps; everything goes into one NetCDF file.

Interventions (``TrainParams.intervention``):

* ``cpt`` — continued pre-training: next-token loss on Wikipedia paragraphs
  (``load_text("train")``) joined by the tokenizer's EOS token and packed into chunks of ``seq_len``
  tokens; every parameter of the model is trained.
* ``full_ft`` — full fine-tuning on the *fact-completion instruction task* below; every parameter
  is trained.
* ``lora`` — LoRA (``peft``) on the same task: adapters of rank ``lora_r`` and scale
  ``lora_alpha / lora_r`` on the ``lora_targets`` matrix types (default: every attention and MLP
  matrix of every layer), base weights frozen. What is recorded is the *effective* matrix
  W0 + (α/r)·B A, computed without merging (the adapters stay unmerged during training), and
  ``delta_norm`` is then the adapter's own norm ‖(α/r)·B A‖_F.

The fact-completion task is built from the committed CounterFact-style records
(``data/facts/<model>.json``): for every record, the rewrite prompt and its paraphrase prompts, each
completed by the record's *true* object, in the template ``TASK_TEMPLATE``::

    Complete the sentence: The original language of Journey to the End of the Night is
    Answer: French<eos>

The loss is the mean NLL of the answer tokens (" French" and the EOS token); prompt tokens are
masked. Records are split by subject (CRC32 of the subject, one in five held out), so no subject of
the held-out examples is trained on: 3,630 training and 858 held-out examples for SmolLM2-135M's
facts file.

Held-out measurements, the same for all interventions: perplexity on ``eval_chunks`` chunks of
``seq_len`` tokens spread evenly over ``load_text("test")`` (articles never in the training text),
and the answer NLL and exact-match accuracy (every answer token the argmax under teacher forcing)
of ``eval_examples`` held-out task examples (a fixed set, independent of the seed).

Optimizer: AdamW (β = ``ADAM_BETAS``, ε = ``ADAM_EPS``), decoupled weight decay ``weight_decay`` on
every parameter with two or more dimensions (matrices, embeddings, LoRA factors) and none on norm
gains and biases; learning rate warmed up linearly over ``warmup_steps`` then constant; gradients
clipped to a total norm of ``grad_clip`` (0: no clipping); ``grad_accum`` micro-batches of
``batch_size`` sequences per optimizer step, the loss normalised by the tokens of the whole step.

A run is a function of its parameters: data order and LoRA initialisation come from ``seed``
(batches are a function of (seed, step) only). Every ``checkpoint_every`` steps the trainable
weights, the optimizer state, the RNG state and the history are saved atomically to
``<output>.state.pt``; a rerun with the same parameters resumes from there and gives the same
numbers as an uninterrupted run. A finished run is reused unless its parameters differ (an error)
or ``overwrite`` is set.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
import zlib
from dataclasses import dataclass

import numpy as np
import torch
import xarray as xr
from tqdm import tqdm

from repro.runs.lifecycle import Run, execute
from repro.data.counterfact import Record, load_records
from repro.data.text import load_text
from repro.core.adapters import add_lora
from repro.core.models import DEFAULT_MODEL, LoadedModel, load_model
from repro.core.paths import from_root
from repro.core.scoring import logprobs_at, pad_rows

log = logging.getLogger(__name__)

INTERVENTIONS = ("cpt", "full_ft", "lora")
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
TASK_TEMPLATE = "Complete the sentence: {prompt}\nAnswer:"
TASK_HELDOUT_EVERY = 5  # a subject is held out when crc32(subject) % 5 == 0
ADAPTER = "post"


@dataclass
class TrainParams:
    """Parameters of one post-training run (a smoke run: the ``smoke`` profile of study.yaml)."""

    intervention: str = "lora"  # "cpt" | "full_ft" | "lora"
    model: str = DEFAULT_MODEL
    steps: int = 300  # optimizer steps
    lr: float = 1e-4  # peak learning rate (after warmup)
    weight_decay: float = 0.0  # AdamW decoupled weight decay (matrices only)
    batch_size: int = 8  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    seq_len: int = 128  # tokens per packed chunk (cpt, held-out perplexity); max task length
    warmup_steps: int = 0  # linear warmup of the learning rate
    grad_clip: float = 1.0  # max total gradient norm; 0 disables clipping
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] | None = None  # matrix types (spec names); None: every type of the spec
    facts: str = "data/facts/smollm2-135m.json"  # source of the fine-tuning task
    record_every: int = 10  # weight norms every k steps (and at 0 and the end)
    eval_every: int = 50  # held-out measurements every k steps (and at 0 and the end)
    eval_chunks: int = 16  # held-out Wikipedia chunks of seq_len tokens (0: none)
    eval_examples: int = 64  # held-out task examples (0: none)
    checkpoint_every: int = 50
    seed: int = 0
    output: str = "data/runs/post_training.nc"
    device: str | None = None

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        if self.intervention not in INTERVENTIONS:
            raise ValueError(f"intervention must be one of {INTERVENTIONS}, got {self.intervention!r}")
        for name in ("steps", "batch_size", "grad_accum", "record_every", "eval_every", "checkpoint_every", "lora_r"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("warmup_steps", "eval_chunks", "eval_examples", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if not isinstance(self.seq_len, int) or self.seq_len < 8:
            raise ValueError(f"seq_len must be an integer >= 8, got {self.seq_len!r}")
        for name in ("lr", "weight_decay", "grad_clip"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha must be > 0, got {self.lora_alpha!r}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.lora_targets is not None and (isinstance(self.lora_targets, str) or not list(self.lora_targets)):
            raise ValueError(f"lora_targets must be a non-empty list of matrix types or None, got {self.lora_targets!r}")
        if not str(self.output).endswith(".nc"):
            raise ValueError(f"output must be a .nc file, got {self.output!r}")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------
_TOKEN_CACHE: dict[tuple, torch.Tensor] = {}


def packed_chunks(tokenizer, split: str, seq_len: int) -> torch.Tensor:
    """The paragraphs of ``load_text(split)`` in file order, each followed by the EOS token,
    concatenated and cut into rows of ``seq_len`` tokens (the incomplete tail is dropped);
    (n_chunks, seq_len) int64 on CPU. Tokenisation is cached per process."""
    key = (split, tokenizer.name_or_path, len(tokenizer), tokenizer.eos_token_id)
    if key not in _TOKEN_CACHE:
        ids = tokenizer(load_text(split), add_special_tokens=False)["input_ids"]
        flat = [t for para in ids for t in (*para, tokenizer.eos_token_id)]
        _TOKEN_CACHE[key] = torch.tensor(flat, dtype=torch.long)
    flat = _TOKEN_CACHE[key]
    n = len(flat) // seq_len
    if n == 0:
        raise ValueError(f"text split {split!r} has fewer than seq_len={seq_len} tokens")
    return flat[: n * seq_len].view(n, seq_len)


def heldout_subject(subject: str) -> bool:
    """Whether a subject's examples are held out of the fine-tuning task (stable across runs)."""
    return zlib.crc32(subject.encode("utf-8")) % TASK_HELDOUT_EVERY == 0


def task_examples(records: list[Record], split: str) -> list[tuple[str, str]]:
    """(prompt, answer) pairs of the fact-completion task for ``split`` ("train" or "test"): the
    rewrite prompt and every paraphrase prompt of each record in ``TASK_TEMPLATE``, answered by
    the record's true object; duplicates dropped, record order kept."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    out, seen = [], set()
    for rec in records:
        rw = rec.requested_rewrite
        if heldout_subject(rw.subject) != (split == "test"):
            continue
        for prompt in [rw.prompt.format(rw.subject), *rec.paraphrase_prompts]:
            pair = (TASK_TEMPLATE.format(prompt=prompt.strip()), rw.target_true.strip())
            if pair not in seen:
                seen.add(pair)
                out.append(pair)
    return out


@dataclass
class TaskSet:
    """Tokenised task examples: prompt ids and answer ids (answer + EOS) per example."""

    prompts: list[list[int]]
    answers: list[list[int]]

    def __len__(self) -> int:
        return len(self.prompts)


def encode_task(tokenizer, examples: list[tuple[str, str]], max_len: int) -> TaskSet:
    """Token ids of each example; prompts are cut from the left so that prompt + answer fits
    ``max_len`` (an answer longer than that is an error)."""
    if not examples:
        return TaskSet([], [])
    prompts = tokenizer([p for p, _ in examples], add_special_tokens=False)["input_ids"]
    answers = tokenizer([" " + a for _, a in examples], add_special_tokens=False)["input_ids"]
    answers = [list(a) + [tokenizer.eos_token_id] for a in answers]
    out_p = []
    for p, a, (_, text) in zip(prompts, answers, examples):
        room = max_len - len(a)
        if room < 1:
            raise ValueError(f"answer {text!r} does not fit seq_len={max_len}")
        out_p.append(list(p)[-room:])
    return TaskSet(out_p, answers)


@dataclass
class TaskBatch:
    input_ids: torch.Tensor  # (B, T) right-padded prompt + answer[:-1]
    attention_mask: torch.Tensor  # (B, T)
    positions: torch.Tensor  # (B, L) positions whose next-token logits predict answer tokens
    labels: torch.Tensor  # (B, L)
    mask: torch.Tensor  # (B, L) float, 1 where row has that many answer tokens

    @property
    def n_tokens(self) -> int:
        return int(self.mask.sum().item())


def collate_task(task: TaskSet, idx, pad_id: int, device) -> TaskBatch:
    """Examples ``idx`` of a task set as a right-padded teacher-forcing batch (:func:`repro.core.scoring.pad_rows`)."""
    b = pad_rows([task.prompts[i] for i in idx], [task.answers[i] for i in idx], pad_id, device)
    return TaskBatch(b.input_ids, b.attention_mask, b.loss_pos, b.labels, b.label_mask)


def example_indices(n: int, step: int, micro: int, params: TrainParams) -> np.ndarray:
    """Indices into a data set of ``n`` examples of micro-batch ``micro`` of optimizer ``step``:
    the examples are read in a seeded random order, a fresh permutation each epoch, so the batch
    depends on (seed, step, micro) only."""
    B = params.batch_size
    start = (step * params.grad_accum + micro) * B
    out = np.empty(B, dtype=np.int64)
    for j in range(B):
        flat = start + j
        epoch, pos = divmod(flat, n)
        out[j] = _permutation(n, params.seed, epoch)[pos]
    return out


_PERM_CACHE: dict[tuple[int, int, int], np.ndarray] = {}


def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    key = (n, seed, epoch)
    if key not in _PERM_CACHE:
        if len(_PERM_CACHE) > 64:
            _PERM_CACHE.clear()
        _PERM_CACHE[key] = np.random.default_rng([seed, epoch]).permutation(n)
    return _PERM_CACHE[key]


@dataclass
class RunData:
    train_chunks: torch.Tensor | None  # cpt
    train_task: TaskSet | None  # full_ft, lora
    eval_chunks: torch.Tensor  # (k, seq_len), may be empty
    eval_task: TaskSet  # may be empty
    describe: dict


def build_data(lm: LoadedModel, params: TrainParams) -> RunData:
    """Training data of the intervention and the held-out sets (see the module docstring)."""
    tok = lm.tokenizer
    records = load_records(from_root(params.facts))
    test_chunks = packed_chunks(tok, "test", params.seq_len)
    k = min(params.eval_chunks, len(test_chunks))
    pick = np.unique(np.linspace(0, len(test_chunks) - 1, k).round().astype(int)) if k else np.array([], dtype=int)
    eval_chunks = test_chunks[torch.as_tensor(pick, dtype=torch.long)]
    test_ex = task_examples(records, "test")
    order = np.random.default_rng(0).permutation(len(test_ex))[: params.eval_examples]
    eval_task = encode_task(tok, [test_ex[i] for i in sorted(order)], params.seq_len)
    describe = {"eval_chunks": int(len(eval_chunks)), "eval_examples": len(eval_task),
                "eval_text": "load_text('test')", "task": "fact completion (TASK_TEMPLATE), true objects",
                "facts_file": params.facts}
    if params.intervention == "cpt":
        chunks = packed_chunks(tok, "train", params.seq_len)
        describe.update(train_text="load_text('train')", train_chunks=int(len(chunks)),
                        train_tokens=int(chunks.numel()))
        return RunData(chunks, None, eval_chunks, eval_task, describe)
    train_ex = task_examples(records, "train")
    task = encode_task(tok, train_ex, params.seq_len)
    describe.update(train_examples=len(task), train_answer_tokens=int(sum(map(len, task.answers))))
    return RunData(None, task, eval_chunks, eval_task, describe)


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------
def lm_nll(lm: LoadedModel, ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL over every position of packed chunks (B, T), and the token count."""
    ids = ids.to(lm.device)
    logits = lm.model(input_ids=ids, use_cache=False).logits
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1), reduction="sum")
    return nll, ids[:, 1:].numel()


def answer_logprobs(lm: LoadedModel, batch: TaskBatch) -> torch.Tensor:
    """Log-probabilities (B, L, V) at the answer positions only (the unembedding is costly)."""
    return logprobs_at(lm, batch, batch.positions)


def answer_nll(lm: LoadedModel, batch: TaskBatch) -> tuple[torch.Tensor, int]:
    """Summed NLL of the answer tokens (answer and EOS) of a task batch, and their count."""
    logp = answer_logprobs(lm, batch)
    tok_lp = logp.gather(-1, batch.labels.unsqueeze(-1)).squeeze(-1)
    return -(tok_lp * batch.mask).sum(), batch.n_tokens


@torch.no_grad()
def evaluate(lm: LoadedModel, data: RunData, batch_size: int) -> dict[str, float]:
    """Held-out Wikipedia perplexity (and mean token NLL), task answer NLL and exact match."""
    was_training = lm.model.training
    lm.model.eval()
    out = {"eval_loss": np.nan, "eval_ppl": np.nan, "task_loss": np.nan, "task_acc": np.nan}
    if len(data.eval_chunks):
        total, count = 0.0, 0
        for s in range(0, len(data.eval_chunks), batch_size):
            nll, n = lm_nll(lm, data.eval_chunks[s : s + batch_size])
            total, count = total + float(nll), count + n
        out["eval_loss"] = total / count
        out["eval_ppl"] = math.exp(out["eval_loss"])
    if len(data.eval_task):
        total, count, hits = 0.0, 0, 0
        pad = lm.tokenizer.pad_token_id
        for s in range(0, len(data.eval_task), batch_size):
            batch = collate_task(data.eval_task, range(s, min(s + batch_size, len(data.eval_task))), pad, lm.device)
            logp = answer_logprobs(lm, batch)
            tok_lp = logp.gather(-1, batch.labels.unsqueeze(-1)).squeeze(-1)
            total += float(-(tok_lp * batch.mask).sum())
            count += batch.n_tokens
            right = (logp.argmax(-1) == batch.labels) | (batch.mask == 0)
            hits += int(right.all(-1).sum())
        out["task_loss"] = total / count
        out["task_acc"] = hits / len(data.eval_task)
    lm.model.train(was_training)
    return out


# --------------------------------------------------------------------------------------------
# The model under training, and the norm recorder
# --------------------------------------------------------------------------------------------
def lora_targets(lm: LoadedModel, params: TrainParams) -> list[str]:
    """The matrix types that get adapters, checked against the architecture spec."""
    types = list(params.lora_targets) if params.lora_targets is not None else list(lm.spec.matrices)
    unknown = [t for t in types if t not in lm.spec.matrices]
    if unknown:
        raise ValueError(f"lora_targets {unknown} are not matrix types of {lm.spec.family}; "
                         f"known: {list(lm.spec.matrices)}")
    return types


def prepare_model(lm: LoadedModel, params: TrainParams) -> list[tuple[str, torch.nn.Parameter]]:
    """Make the model trainable for the intervention (every parameter, or LoRA adapters wrapped
    into the model in place, their initialisation seeded) and return the trainable parameters by
    name, in a fixed order."""
    model = lm.model
    if params.intervention in ("cpt", "full_ft"):
        model.requires_grad_(True)
    else:
        types = lora_targets(lm, params)
        model.requires_grad_(False)
        wrapped = add_lora(lm, [(l, t) for l in range(lm.n_layers) for t in types], rank=params.lora_r,
                           alpha=params.lora_alpha, dropout=params.lora_dropout, seed=params.seed, adapter=ADAPTER)
        lm.peft_model = wrapped  # keep peft's wrapper alive; the injected layers live in lm.model
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise RuntimeError("no trainable parameters")
    return named


def lora_delta(module: torch.nn.Module, dtype=torch.float64) -> torch.Tensor | None:
    """Σ over the module's active LoRA adapters of (α/r)·B A, as an (out, in) matrix; None when the
    module has no adapter. Computed from the factors, the module untouched."""
    if not hasattr(module, "lora_A"):
        return None
    delta = None
    active = module.active_adapters if hasattr(module, "active_adapters") else list(module.lora_A)
    for name in active:
        if name not in module.lora_A:
            continue
        a = module.lora_A[name].weight.detach().to(dtype)
        b = module.lora_B[name].weight.detach().to(dtype)
        d = float(module.scaling[name]) * (b @ a)
        delta = d if delta is None else delta + d
    return delta


def base_weight(lm: LoadedModel, layer: int, mtype: str) -> torch.Tensor:
    """The (out, in) weight of a matrix, under a LoRA wrapper its frozen base weight W0."""
    module = lm.spec.matrix_module(lm.model, layer, mtype)
    w = getattr(module, "base_layer", module).weight
    return w.T if mtype in lm.spec.transposed else w


@torch.no_grad()
def effective_weight(lm: LoadedModel, layer: int, mtype: str, dtype=torch.float64) -> torch.Tensor:
    """The (out, in) matrix the model computes with: W, or W0 + (α/r)·B A under LoRA adapters
    (what ``merge_and_unload`` would write), as a new tensor of ``dtype``."""
    module = lm.spec.matrix_module(lm.model, layer, mtype)
    w = base_weight(lm, layer, mtype).detach().to(dtype)
    delta = lora_delta(module, dtype)
    return w.clone() if delta is None else w + delta


class NormRecorder:
    """Frobenius norms of every decoder-layer weight matrix of the spec, as the model trains.

    ``measure()`` returns ``weight_norm`` = ‖W_t‖_F (for LoRA: of the effective W0 + (α/r)BA) and
    ``delta_norm`` = ‖W_t − W_0‖_F (for LoRA: ‖(α/r)BA‖_F, the adapter's own norm), both
    (layer, matrix) float64 arrays; ``embed_norm`` the norm of the input embedding matrix. The
    starting weights are copied when the recorder is made (not for LoRA, whose base is frozen).
    """

    def __init__(self, lm: LoadedModel):
        self.lm = lm
        self.types = list(lm.spec.matrices)
        self.matrices = [(l, t) for l in range(lm.n_layers) for t in self.types]
        self.lora = any(hasattr(lm.spec.matrix_module(lm.model, l, t), "lora_A") for l, t in self.matrices)
        self.start = None if self.lora else {
            key: base_weight(lm, *key).detach().clone() for key in self.matrices}

    @property
    def paths(self) -> list[str]:
        """Dotted module paths of the recorded matrices, layer-major."""
        return [self.lm.spec.matrix_path(l, t) for l, t in self.matrices]

    @torch.no_grad()
    def measure(self) -> dict[str, np.ndarray | float]:
        L, M = self.lm.n_layers, len(self.types)
        norm, delta = np.zeros((L, M)), np.zeros((L, M))
        for layer, mtype in self.matrices:
            j = self.types.index(mtype)
            if self.lora:
                module = self.lm.spec.matrix_module(self.lm.model, layer, mtype)
                w0 = base_weight(self.lm, layer, mtype).detach().double()
                d = lora_delta(module)
                eff = w0 if d is None else w0 + d
                delta[layer, j] = 0.0 if d is None else torch.linalg.vector_norm(d).item()
            else:
                eff = base_weight(self.lm, layer, mtype).detach().double()
                delta[layer, j] = torch.linalg.vector_norm(eff - self.start[(layer, mtype)].double()).item()
            norm[layer, j] = torch.linalg.vector_norm(eff).item()
        embed = self.lm.model.get_input_embeddings().weight.detach()
        return {"weight_norm": norm, "delta_norm": delta,
                "embed_norm": torch.linalg.vector_norm(embed.double()).item()}


def make_optimizer(named: list[tuple[str, torch.nn.Parameter]], params: TrainParams) -> torch.optim.AdamW:
    """AdamW (fused kernel on CPU and CUDA): weight decay on parameters with >= 2 dimensions,
    none on gains and biases."""
    decay = [p for _, p in named if p.ndim >= 2]
    no_decay = [p for _, p in named if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": params.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    device = named[0][1].device
    # the fused kernel (CPU and CUDA) is several times faster than the per-tensor loop on CPU
    fused = {"fused": True} if device.type in ("cpu", "cuda") else {}
    return torch.optim.AdamW(groups, lr=params.lr, betas=ADAM_BETAS, eps=ADAM_EPS, **fused)


def lr_at(step: int, params: TrainParams) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup, then constant."""
    if params.warmup_steps and step < params.warmup_steps:
        return params.lr * (step + 1) / params.warmup_steps
    return params.lr


# --------------------------------------------------------------------------------------------
# One optimizer step, and the run
# --------------------------------------------------------------------------------------------
def train_step(lm: LoadedModel, data: RunData, named, opt, step: int, params: TrainParams) -> tuple[float, float]:
    """One optimizer step (``grad_accum`` micro-batches); returns (mean token loss, gradient norm
    before clipping)."""
    lm.model.train()
    for group in opt.param_groups:
        group["lr"] = lr_at(step, params)
    opt.zero_grad(set_to_none=True)
    micro = range(params.grad_accum)
    if params.intervention == "cpt":
        batches = [data.train_chunks[torch.as_tensor(example_indices(len(data.train_chunks), step, m, params))]
                   for m in micro]
        total = sum(b[:, 1:].numel() for b in batches)
        loss_fn = lm_nll
    else:
        pad = lm.tokenizer.pad_token_id
        batches = [collate_task(data.train_task, example_indices(len(data.train_task), step, m, params), pad, lm.device)
                   for m in micro]
        total = sum(b.n_tokens for b in batches)
        loss_fn = answer_nll
    loss_sum = 0.0
    for batch in batches:
        nll, _ = loss_fn(lm, batch)
        (nll / total).backward()
        loss_sum += float(nll.detach())
    trainable = [p for _, p in named]
    clip = params.grad_clip if params.grad_clip > 0 else float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, clip))
    opt.step()
    opt.zero_grad(set_to_none=True)
    lm.model.eval()
    return loss_sum / total, grad_norm


HISTORY = ("rec_step", "weight_norm", "delta_norm", "embed_norm", "train_loss", "grad_norm", "lr",
           "step_seconds", "eval_step", "eval_loss", "eval_ppl", "task_loss", "task_acc")


def run_training(params: TrainParams, overwrite: bool = False, progress: bool = True) -> xr.Dataset:
    """Run (or resume, or reuse) a post-training run and return its Dataset (see module docs)."""
    return execute(params, lambda run: _run(params, run, progress), overwrite)


def _run(params: TrainParams, run: Run, progress: bool) -> xr.Dataset:
    torch.manual_seed(params.seed)
    lm = load_model(params.model, device=params.device)
    data = build_data(lm, params)
    named = prepare_model(lm, params)  # changes no weight: adapters start with B = 0
    recorder = NormRecorder(lm)
    opt = make_optimizer(named, params)

    state = {"done": 0, "hist": {k: [] for k in HISTORY}}
    saved = run.resume()
    if saved is not None:
        with torch.no_grad():
            for name, p in named:
                p.copy_(saved["trainable"][name].to(p.device))
        opt.load_state_dict(saved["opt"])
        torch.set_rng_state(saved["rng"])
        if saved.get("cuda_rng") is not None and lm.device.type == "cuda":
            torch.cuda.set_rng_state(saved["cuda_rng"], lm.device)
        state = {k: saved[k] for k in ("done", "hist")}
        log.info("%s: %d steps done", run.output.name, state["done"])
    hist = state["hist"]

    def record(step: int) -> None:
        hist["rec_step"].append(step)
        for key, value in recorder.measure().items():
            hist[key].append(value)

    def run_eval(step: int) -> None:
        hist["eval_step"].append(step)
        for key, value in evaluate(lm, data, params.batch_size).items():
            hist[key].append(value)

    def checkpoint() -> None:
        run.save({
            **state, "trainable": {n: p.detach().cpu().clone() for n, p in named},
            "opt": opt.state_dict(), "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(lm.device) if lm.device.type == "cuda" else None})

    if state["done"] == 0 and not hist["rec_step"]:
        record(0)
        run_eval(0)
    bar = tqdm(total=params.steps, initial=state["done"], desc=f"{params.intervention} steps", disable=not progress)
    while state["done"] < params.steps:
        step = state["done"]
        ts = time.perf_counter()
        loss, gnorm = train_step(lm, data, named, opt, step, params)
        hist["train_loss"].append(loss)
        hist["grad_norm"].append(gnorm)
        hist["lr"].append(lr_at(step, params))
        hist["step_seconds"].append(time.perf_counter() - ts)
        state["done"] = step + 1
        n = state["done"]
        if n % params.record_every == 0 or n == params.steps:
            record(n)
        if n % params.eval_every == 0 or n == params.steps:
            run_eval(n)
        if n % params.checkpoint_every == 0 and n < params.steps:
            checkpoint()
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")
    bar.close()

    ds = _to_dataset(lm, params, hist, recorder)
    return run.finish(
        ds, str(lm.device), model=params.model, intervention=params.intervention,
        optimizer=f"AdamW(betas={ADAM_BETAS}, eps={ADAM_EPS}, fused={opt.defaults.get('fused')}, "
                  f"weight_decay={params.weight_decay} on "
                  f">=2-D parameters), lr {params.lr} (linear warmup {params.warmup_steps} steps, then "
                  f"constant), grad clip {params.grad_clip}",
        n_trainable=int(sum(p.numel() for _, p in named)),
        n_params=int(sum(p.numel() for p in lm.model.parameters())),
        lora_targets=lora_targets(lm, params) if params.intervention == "lora" else [],
        tokens_per_step=_tokens_per_step(params), data=data.describe, task_template=TASK_TEMPLATE,
        threads=torch.get_num_threads(),
    )


def _tokens_per_step(params: TrainParams) -> str:
    seqs = params.batch_size * params.grad_accum
    if params.intervention == "cpt":
        return f"{seqs} chunks x {params.seq_len} tokens"
    return f"{seqs} task examples (answer tokens in the loss)"


def _to_dataset(lm: LoadedModel, params: TrainParams, hist: dict, recorder: NormRecorder) -> xr.Dataset:
    types = recorder.types
    trained = np.zeros((lm.n_layers, len(types)), dtype=np.int8)
    if params.intervention == "lora":
        for t in lora_targets(lm, params):
            trained[:, types.index(t)] = 1
    else:
        trained[:] = 1
    f = lambda k: np.asarray(hist[k], dtype=float)  # noqa: E731
    ds = xr.Dataset(
        {
            "weight_norm": (("step", "layer", "matrix"), np.stack(hist["weight_norm"])),
            "delta_norm": (("step", "layer", "matrix"), np.stack(hist["delta_norm"])),
            "embed_norm": ("step", f("embed_norm")),
            "trained": (("layer", "matrix"), trained),
            "train_loss": ("opt_step", f("train_loss")),
            "grad_norm": ("opt_step", f("grad_norm")),
            "lr": ("opt_step", f("lr")),
            "step_seconds": ("opt_step", f("step_seconds")),
            "eval_loss": ("eval_step", f("eval_loss")),
            "eval_ppl": ("eval_step", f("eval_ppl")),
            "task_loss": ("eval_step", f("task_loss")),
            "task_acc": ("eval_step", f("task_acc")),
        },
        coords={"step": np.array(hist["rec_step"]), "layer": np.arange(lm.n_layers), "matrix": types,
                "opt_step": np.arange(1, len(hist["train_loss"]) + 1), "eval_step": np.array(hist["eval_step"])},
    )
    lora = params.intervention == "lora"
    ds["weight_norm"].attrs["long_name"] = (
        "‖W0 + (α/r)BA‖_F of the effective matrix after `step` optimizer steps" if lora
        else "‖W‖_F after `step` optimizer steps")
    ds["delta_norm"].attrs["long_name"] = (
        "‖(α/r)BA‖_F, the adapter's own norm" if lora else "‖W_step − W_0‖_F: how far training moved the matrix")
    ds["embed_norm"].attrs["long_name"] = "‖E‖_F of the input embedding matrix"
    ds["trained"].attrs["long_name"] = "1 where the matrix is trained (directly, or through a LoRA adapter)"
    ds["train_loss"].attrs["long_name"] = "mean token NLL of the step's training batch, before the update"
    ds["grad_norm"].attrs["long_name"] = "total gradient norm before clipping"
    ds["step_seconds"].attrs["long_name"] = "wall seconds of the optimizer step (forward, backward, update)"
    ds["eval_ppl"].attrs["long_name"] = "perplexity on held-out Wikipedia chunks"
    ds["eval_loss"].attrs["long_name"] = "mean token NLL on held-out Wikipedia chunks"
    ds["task_loss"].attrs["long_name"] = "mean answer-token NLL on held-out task examples"
    ds["task_acc"].attrs["long_name"] = "share of held-out task examples whose every answer token is the argmax"
    return ds
