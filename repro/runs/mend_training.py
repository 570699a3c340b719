"""Meta-training of MEND's hypernetwork (:mod:`repro.editors.mend`) on CounterFact-style edits.

One step, for a batch of edits drawn only from the training split (``split_of(record) == "train"``):

1. with the unedited model, the fine-tuning gradient of the edit — the teacher-forced NLL of
   ``target_new`` after the rewrite prompt — gives the factors (x, δ) of every edited matrix; the
   same forward pass gives p_original on the locality prompts;
2. the network turns the factors into ΔW, applied functionally (``torch.func.functional_call``
   with W + ΔW), so that the losses below differentiate through ΔW into the network;
3. ``L_edit``: mean token NLL of ``target_new`` after the paraphrase prompts and the rewrite prompt
   under the edited weights; ``L_loc``: KL(p_original ‖ p_edited) of the next-token distributions
   at every position of unrelated prompts (neighborhood prompts of other training records — some
   of records with the same relation as an edit — and the start of a Wikipedia training paragraph);
4. loss = c_edit·L_edit + c_loc·L_loc; Adam on the network's parameters and on the step sizes α.

MEND's own choice is c_edit = 0.1 with c_loc = 1 (Mitchell et al., 2022); we keep it. A fixed set
of training-split facts is held out of the meta-training batches and edited every ``val_every``
steps to follow generalisation; evaluation-split facts are never touched. Training checkpoints to
``<output>.state.pt`` and resumes from it.
"""
from __future__ import annotations

import dataclasses
import logging

import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import xarray as xr
from tqdm import tqdm

from repro.core import store
from repro.runs.lifecycle import Run, execute
from repro.data.counterfact import Record, load_records, to_request
from repro.data.splits import split_of
from repro.measure.rewrite import record_scores
from repro.core.hooks import capture
from repro.core.models import DEFAULT_MODEL, LoadedModel, copy_weights, load_model, put_weights
from repro.core.paths import from_root
from repro.core.scoring import PromptBatch, encode_rows, logprobs_at, row_nll
from repro.editors.base import load_hparams
from repro.editors.mend import (
    MEND, MENDHyperParams, MENDNet, gradient_factors, load_mend, matrix_key, resolve_matrices, save_mend,
    target_batch,
)

log = logging.getLogger(__name__)


@dataclass
class MENDTrainParams:
    model: str = DEFAULT_MODEL
    facts: str = "data/facts/smollm2-135m.json"
    steps: int = 300
    edits_per_step: int = 1
    lr: float = 1e-3  # Adam, network parameters (MEND: 1e-6 over far more steps)
    lr_alpha: float = 1e-4  # Adam, step sizes α
    c_edit: float = 0.1
    c_loc: float = 1.0
    n_loc_prompts: int = 4  # neighborhood prompts of other training records per step
    # ... of which this many come from records with an edited relation (when there are such): they
    # share the edit's relation and often its true object, the hardest prompts to leave unchanged
    n_loc_related: int = 2
    # neighborhood prompts of the edited (training) records themselves, per edit, on top: other
    # subjects whose true object is often the edit's old one (CounterFact's NS prompts)
    n_loc_own: int = 0
    loc_text_words: int = 24  # words of one Wikipedia training paragraph per step (0: none)
    n_paraphrases: int = 2  # paraphrase prompts per edit in L_edit (plus the rewrite prompt)
    stats_warmup: int = 20  # training edits whose factors initialise the statistics
    grad_clip: float = 10.0
    n_val: int = 16  # training-split facts held out of the batches, edited for validation
    val_every: int = 50
    checkpoint_every: int = 20
    seed: int = 0
    # never the packaged weights the mend editor loads (repro/editors/weights/): study.yaml names those
    weights: str = "data/runs/mend_weights.pt"
    output: str = "data/runs/mend_train.nc"
    device: str | None = None
    hparams: dict = field(default_factory=dict)  # MEND architecture overrides (hparams/mend.yaml)

    def validate(self) -> None:
        for name in ("steps", "edits_per_step", "val_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not str(self.output).endswith(".nc"):
            raise ValueError(f"output must be a .nc file, got {self.output!r}")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# Forward passes with functionally edited weights
# --------------------------------------------------------------------------------------------
def hidden_states(
    lm: LoadedModel, batch: PromptBatch, matrices: list[tuple[int, str]] | None = None,
    deltas: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Final hidden states (B, T, H) with W + ΔW in place of each edited matrix; the model's own
    parameters are untouched and gradients flow into ``deltas``."""
    base = lm.spec.base_model(lm.model)
    kwargs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    if not deltas:
        return base(**kwargs).last_hidden_state
    prefix = lm.spec.base + "."
    params = {}
    for layer, mtype in matrices:
        path = lm.spec.matrix_path(layer, mtype)
        if not path.startswith(prefix):
            raise ValueError(f"matrix {path} lies outside the base model {lm.spec.base}")
        weight = lm.spec.matrix_module(lm.model, layer, mtype).weight
        delta = deltas[matrix_key(layer, mtype)].to(weight.dtype)
        params[path[len(prefix):] + ".weight"] = weight + (delta.T if mtype in lm.spec.transposed else delta)
    return torch.func.functional_call(base, params, (), kwargs).last_hidden_state


def all_positions(batch: PromptBatch, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
    """Every position of ``rows`` with its real-token mask (for KL over whole prompts)."""
    mask = batch.attention_mask[rows]
    pos = torch.arange(mask.shape[1], device=mask.device).expand(mask.shape[0], -1)
    return pos, mask.float()


def masked_kl(logp_ref: torch.Tensor, logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over masked positions of KL(p_ref ‖ p)."""
    kl = (logp_ref.exp() * (logp_ref - logp)).sum(-1)
    return (kl * mask).sum() / mask.sum().clamp(min=1)


# --------------------------------------------------------------------------------------------
# One meta-training step
# --------------------------------------------------------------------------------------------
def edit_prompts(rec: Record, n_paraphrases: int) -> list[str]:
    rw = rec.requested_rewrite
    return [rw.prompt.format(rw.subject)] + list(rec.paraphrase_prompts[:n_paraphrases])


def meta_loss(
    lm: LoadedModel, net: MENDNet, matrices: list[tuple[int, str]], edits: list[Record],
    loc_texts: list[str], cfg: MENDTrainParams, update_stats: bool = False,
) -> dict[str, torch.Tensor]:
    """The MEND losses of one batch of edits (differentiable w.r.t. the network)."""
    reqs = [to_request(r) for r in edits]
    k, n_loc = len(reqs), len(loc_texts)
    # pass 1, unedited: the edit's fine-tuning gradient (rows :k) and p_original (the loc rows)
    first = encode_rows(lm, [r.text for r in reqs] + loc_texts, [r.target_new for r in reqs] + [None] * n_loc)
    factors, hidden0 = _factors_and_hidden(lm, matrices, first, k)
    loc_pos0, loc_mask0 = all_positions(first, slice(k, k + n_loc))
    with torch.no_grad():
        logp_orig = logprobs_at(lm, hidden0[k:], loc_pos0) if n_loc else None
    if update_stats:
        net.update_stats(factors)
    deltas = net.updates(factors)

    # pass 2, edited: new and true targets after rewrite + paraphrase prompts, and the loc rows
    texts, new_t, true_t, is_para = [], [], [], []
    for rec in edits:
        prompts = edit_prompts(rec, cfg.n_paraphrases)
        texts += prompts
        new_t += [rec.requested_rewrite.target_new] * len(prompts)
        true_t += [rec.requested_rewrite.target_true] * len(prompts)
        is_para += [False] + [True] * (len(prompts) - 1)
    m = len(texts)
    second = encode_rows(lm, texts + texts + loc_texts, new_t + true_t + [None] * n_loc)
    hidden = hidden_states(lm, second, matrices, deltas)
    nll = row_nll(logprobs_at(lm, hidden[: 2 * m], second.loss_pos[: 2 * m]), second.labels[: 2 * m],
                  second.label_mask[: 2 * m])
    nll_new, nll_true = nll[:m], nll[m:]
    edit_loss = nll_new.mean()
    if n_loc:
        loc_pos, loc_mask = all_positions(second, slice(2 * m, 2 * m + n_loc))
        # both passes right-pad the same loc texts: their positions line up
        T = min(loc_pos.shape[1], loc_pos0.shape[1])
        logp_edit = logprobs_at(lm, hidden[2 * m :], loc_pos[:, :T])
        loc_loss = masked_kl(logp_orig[:, :T], logp_edit, loc_mask[:, :T] * loc_mask0[:, :T])
    else:
        loc_loss = torch.zeros((), device=lm.device)
    win = (nll_new < nll_true).float().detach()
    para = torch.tensor(is_para, device=lm.device)
    return {
        "loss": cfg.c_edit * edit_loss + cfg.c_loc * loc_loss,
        "edit_loss": edit_loss,
        "loc_loss": loc_loss,
        "edit_success": win[para].mean() if para.any() else win.mean(),
        "rewrite_success": win[~para].mean(),
        "delta_norm": torch.sqrt(sum((d.detach() ** 2).sum() for d in deltas.values())),
    }


def _factors_and_hidden(lm, matrices, batch, rows):
    """:func:`gradient_factors` plus the final hidden states of every row of that pass."""
    with capture({"base": lm.spec.base_model(lm.model)}, first=False) as got:
        factors, _, _ = gradient_factors(lm, matrices, batch, rows)
    return factors, got["base"].last_hidden_state.detach()


# --------------------------------------------------------------------------------------------
# Validation (held-out training-split facts) and evaluation (any facts, through the editor)
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def validate(lm: LoadedModel, net: MENDNet, matrices, records: list[Record], cfg: MENDTrainParams) -> dict[str, float]:
    """Edit each record alone (functionally) and score it: ``es`` rewrite prompt, ``ps``
    paraphrases, ``ns`` neighborhood prompts still preferring the true object; ``edit_loss`` and
    ``loc_loss`` as in training (loc on the record's own neighborhood prompts)."""
    out = {"es": [], "ps": [], "ns": [], "edit_loss": [], "loc_loss": []}
    for rec in records:
        rw = rec.requested_rewrite
        neigh = list(rec.neighborhood_prompts[: cfg.n_loc_prompts or 4])
        first = encode_rows(lm, [rw.prompt.format(rw.subject)] + neigh, [rw.target_new] + [None] * len(neigh))
        factors, hidden0 = _factors_and_hidden(lm, matrices, first, 1)
        pos0, mask0 = all_positions(first, slice(1, None))
        logp_orig = logprobs_at(lm, hidden0[1:], pos0)
        deltas = net.updates(factors)
        prompts = edit_prompts(rec, len(rec.paraphrase_prompts)) + neigh
        m = len(prompts)
        second = encode_rows(lm, prompts + prompts + neigh, [rw.target_new] * m + [rw.target_true] * m + [None] * len(neigh))
        hidden = hidden_states(lm, second, matrices, deltas)
        nll = row_nll(logprobs_at(lm, hidden[: 2 * m], second.loss_pos[: 2 * m]), second.labels[: 2 * m],
                      second.label_mask[: 2 * m])
        win = (nll[:m] < nll[m:]).float().cpu().numpy()
        n_edit = m - len(neigh)
        out["es"].append(win[0])
        out["ps"].append(win[1:n_edit].mean())
        out["ns"].append(1 - win[n_edit:].mean() if neigh else np.nan)
        out["edit_loss"].append(float(nll[:n_edit].mean()))
        pos, mask = all_positions(second, slice(2 * m, None))
        T = min(pos.shape[1], pos0.shape[1])
        out["loc_loss"].append(float(masked_kl(logp_orig[:, :T], logprobs_at(lm, hidden[2 * m :], pos[:, :T]),
                                               mask[:, :T] * mask0[:, :T])))
    return {k: float(np.nanmean(v)) for k, v in out.items()}


def edit_efficacy(lm: LoadedModel, editor: MEND, records: list[Record], progress: bool = False) -> dict[str, np.ndarray]:
    """CounterFact scores (es, ps, ns per record) of single edits made in place by ``editor``,
    each on the weights as they were before it (restored after every edit)."""
    matrices = editor.edited_matrices()
    saved = copy_weights(lm, matrices)
    scores = {"es": [], "ps": [], "ns": []}
    try:
        for rec in tqdm(records, desc="MEND single edits", disable=not progress):
            editor.apply([to_request(rec)])
            for key, val in record_scores(lm, [rec]).items():
                scores[key].append(val[0])
            put_weights(lm, matrices, saved)
    finally:
        put_weights(lm, matrices, saved)
    return {k: np.array(v) for k, v in scores.items()}


# --------------------------------------------------------------------------------------------
# The training loop
# --------------------------------------------------------------------------------------------
def split_training_records(records: list[Record], n_val: int, seed: int) -> tuple[list[Record], list[Record]]:
    """(meta-training pool, validation facts), both from the training split only; no subject of
    the validation facts appears in the pool."""
    pool = [r for r in records if split_of(r) == "train"]
    random.Random(seed).shuffle(pool)
    val, subjects = [], set()
    for rec in pool:
        if len(val) == n_val:
            break
        if rec.requested_rewrite.subject not in subjects:
            val.append(rec)
            subjects.add(rec.requested_rewrite.subject)
    train = [r for r in pool if r.requested_rewrite.subject not in subjects]
    if not train:
        raise ValueError("no training-split records left for meta-training")
    return train, val


def sample_step(step: int, pool: list[Record], texts: list[str], cfg: MENDTrainParams) -> tuple[list[Record], list[str]]:
    """The edits and locality prompts of one step, a function of (seed, step) only (so that a
    resumed run draws the same batches)."""
    rng = random.Random(cfg.seed * 1_000_003 + step)
    edits = rng.sample(pool, min(cfg.edits_per_step, len(pool)))
    subjects = {r.requested_rewrite.subject for r in edits}
    relations = {r.relation_id for r in edits}
    others = [r for r in pool if r not in edits]
    related = [r for r in others if r.relation_id in relations]
    loc: list[str] = []
    for source, n in ((related, min(cfg.n_loc_related, cfg.n_loc_prompts)), (others, cfg.n_loc_prompts)):
        for _ in range(20 * cfg.n_loc_prompts):
            if len(loc) >= n or not source:
                break
            prompt = rng.choice(rng.choice(source).neighborhood_prompts)
            if not any(s in prompt for s in subjects) and prompt not in loc:
                loc.append(prompt)
    for rec in edits:
        own = [p for p in rec.neighborhood_prompts if p not in loc and not any(s in p for s in subjects)]
        loc += rng.sample(own, min(cfg.n_loc_own, len(own)))
    if cfg.loc_text_words and texts:
        loc.append(" ".join(rng.choice(texts).split()[: cfg.loc_text_words]))
    return edits, loc


def warm_up_statistics(lm: LoadedModel, net: MENDNet, matrices: list[tuple[int, str]], pool: list[Record],
                       cfg: MENDTrainParams) -> None:
    """Initialise the standardisation statistics from the factors of ``cfg.stats_warmup`` edits."""
    for rec in random.Random(cfg.seed + 1).sample(pool, min(cfg.stats_warmup, len(pool))):
        factors, _, _ = gradient_factors(lm, matrices, target_batch(lm, [to_request(rec)]))
        net.update_stats(factors)


def initial_network(lm: LoadedModel, hparams: MENDHyperParams, records: list[Record], cfg: MENDTrainParams) -> MENDNet:
    """The network as meta-training starts it (step 0): identity g, α = ``alpha_init``, statistics
    from the warm-up edits — the untrained baseline."""
    pool, _ = split_training_records([r for r in records if split_of(r) == "train"], cfg.n_val, cfg.seed)
    torch.manual_seed(cfg.seed)
    net = MENDNet.for_model(lm, hparams)
    warm_up_statistics(lm, net, resolve_matrices(lm, hparams), pool, cfg)
    return net.eval()


def train_mend(
    lm: LoadedModel, hparams: MENDHyperParams, records: list[Record], cfg: MENDTrainParams,
    run: Run | None = None, texts: list[str] | None = None, progress: bool = True,
) -> tuple[MENDNet, dict]:
    """Meta-train a MEND network for ``lm`` on the training-split ``records``.

    Returns the network and the history: per step ``loss``, ``edit_loss``, ``loc_loss``,
    ``edit_success`` (paraphrases), ``rewrite_success``, ``delta_norm``, ``alpha`` (per matrix),
    ``seconds``; per validation point ``val_step`` and ``val_<metric>`` (see :func:`validate`),
    step 0 being the untrained network. With ``run`` (:class:`repro.runs.lifecycle.Run`) the training checkpoints to
    its state file and resumes from it.
    """
    if any(split_of(r) != "train" for r in records):
        records = [r for r in records if split_of(r) == "train"]  # never meta-train on eval facts
    pool, val_recs = split_training_records(records, cfg.n_val, cfg.seed)
    texts = texts or []
    matrices = resolve_matrices(lm, hparams)
    torch.manual_seed(cfg.seed)
    net = MENDNet.for_model(lm, hparams)
    params_g = [p for n, p in net.named_parameters() if not n.startswith("alpha.")]
    opt = torch.optim.Adam([
        {"params": params_g, "lr": cfg.lr},
        {"params": list(net.alpha.parameters()), "lr": cfg.lr_alpha},
    ])
    hist: dict[str, list] = {k: [] for k in (
        "loss", "edit_loss", "loc_loss", "edit_success", "rewrite_success", "delta_norm", "alpha", "seconds",
        "val_step", "val_es", "val_ps", "val_ns", "val_edit_loss", "val_loc_loss")}
    done, t0 = 0, time.perf_counter()
    hp_dict = dataclasses.asdict(hparams)
    saved = run.resume(check=lambda st: st.get("hparams") == hp_dict) if run is not None else None
    if saved is not None:
        net.load_state_dict(saved["net"])
        opt.load_state_dict(saved["opt"])
        hist, done = saved["hist"], saved["done"]
        log.info("MEND training: %d steps done", done)

    def checkpoint():
        if run is not None:
            run.save({"hparams": hp_dict, "net": net.state_dict(), "opt": opt.state_dict(), "hist": hist,
                      "done": done})

    def run_validation(step):
        if not val_recs:
            return
        net.eval()
        scores = validate(lm, net, matrices, val_recs, cfg)
        hist["val_step"].append(step)
        for key, value in scores.items():
            hist[f"val_{key}"].append(value)
        log.info("step %d validation %s", step, scores)

    if done == 0:
        warm_up_statistics(lm, net, matrices, pool, cfg)  # so that the first steps see standardised inputs
        run_validation(0)
    bar = tqdm(total=cfg.steps, initial=done, desc="MEND meta-training", disable=not progress)
    while done < cfg.steps:
        ts = time.perf_counter()
        edits, loc = sample_step(done, pool, texts, cfg)
        net.train()
        opt.zero_grad()
        out = meta_loss(lm, net, matrices, edits, loc, cfg, update_stats=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params_g, cfg.grad_clip)
        opt.step()
        done += 1
        for key in ("loss", "edit_loss", "loc_loss", "edit_success", "rewrite_success", "delta_norm"):
            hist[key].append(float(out[key].detach()))
        hist["alpha"].append([float(net.alpha[matrix_key(l, m)].detach()) for l, m in matrices])
        hist["seconds"].append(time.perf_counter() - ts)
        bar.update(1)
        bar.set_postfix(loss=f"{hist['loss'][-1]:.3f}", edit=f"{hist['edit_loss'][-1]:.2f}",
                        loc=f"{hist['loc_loss'][-1]:.3f}", ok=f"{hist['edit_success'][-1]:.2f}")
        if done % cfg.val_every == 0 or done == cfg.steps:
            run_validation(done)
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            checkpoint()
    bar.close()
    hist["wall_time_s"] = run.elapsed() if run is not None else time.perf_counter() - t0
    net.eval()
    return net, hist


def history_dataset(hist: dict, matrices: list[tuple[int, str]]) -> xr.Dataset:
    """The training curve as a Dataset: dims ``step`` (1..steps), ``matrix``, ``val_step``."""
    steps = np.arange(1, len(hist["loss"]) + 1)
    data = {k: ("step", np.asarray(hist[k], dtype=float)) for k in
            ("loss", "edit_loss", "loc_loss", "edit_success", "rewrite_success", "delta_norm", "seconds")}
    alpha = np.asarray(hist["alpha"], dtype=float).reshape(len(steps), len(matrices))
    data["alpha"] = (("step", "matrix"), alpha)
    for k in ("es", "ps", "ns", "edit_loss", "loc_loss"):
        data[f"val_{k}"] = ("val_step", np.asarray(hist[f"val_{k}"], dtype=float))
    ds = xr.Dataset(data, coords={"step": steps, "matrix": [matrix_key(l, m) for l, m in matrices],
                                  "val_step": np.asarray(hist["val_step"], dtype=int)})
    ds["edit_success"].attrs["description"] = "share of paraphrase prompts preferring the new object after the edit"
    ds["val_ps"].attrs["description"] = "held-out training-split facts: paraphrase success of single edits"
    return ds


def run_training(cfg: MENDTrainParams, overwrite: bool = False,
                 progress: bool = True) -> tuple[xr.Dataset, MENDNet, LoadedModel]:
    """Load the model and the facts, meta-train, save the weights and the training curve; return
    the curve, the network and the model. A finished run with the same parameters is reused: its
    network is read back from ``cfg.weights``."""
    made: dict = {}

    def body(run: Run) -> xr.Dataset:
        from repro.data.text import load_text

        lm = load_model(cfg.model, device=cfg.device)
        hp = load_hparams(MENDHyperParams, "mend", lm, cfg.hparams)
        records = [r for r in load_records(from_root(cfg.facts)) if split_of(r) == "train"]
        net, hist = train_mend(lm, hp, records, cfg, run=run, texts=load_text("train"), progress=progress)
        matrices = resolve_matrices(lm, hp)
        ds = history_dataset(hist, matrices)
        made.update(net=net, lm=lm)
        sha = store.git_sha()
        save_mend(cfg.weights, net, hp, lm.name, train_params=cfg.as_dict(), git_sha=sha,
                  final={k: float(ds[k][-20:].mean()) for k in ("loss", "edit_loss", "loc_loss", "edit_success")})
        return run.finish(
            ds, str(lm.device), wall_time=False, model=cfg.model, editor="mend",
            edited_matrices=[matrix_key(l, m) for l, m in matrices], hparams=dataclasses.asdict(hp),
            facts_file=cfg.facts, wall_time_s=round(hist["wall_time_s"], 2),
        )

    ds = execute(cfg, body, overwrite)
    if made:
        return ds, made["net"], made["lm"]
    lm = load_model(cfg.model, device=cfg.device)  # reused: the network the run saved
    net, blob = load_mend(cfg.weights, lm)
    if blob.get("meta", {}).get("train_params") != cfg.as_dict():
        raise ValueError(f"{cfg.weights} was not saved by the finished run {cfg.output} (other training "
                         f"parameters): rerun it with overwrite=True")
    return ds, net.eval(), lm


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------
def summarize_training(ds: xr.Dataset, window: int = 20) -> str:
    """Means of the per-step curves over the first and last ``window`` steps, and validation."""
    n = ds.sizes["step"]
    w = max(1, min(window, n // 2 or 1))
    lines = [f"MEND meta-training of {ds.attrs.get('model', '?')}: {n} steps, "
             f"{float(ds['seconds'].sum()):.0f} s of steps; means over the first / last {w} steps:"]
    for k in ("loss", "edit_loss", "loc_loss", "edit_success", "rewrite_success", "delta_norm"):
        lines.append(f"  {k:16s} {float(ds[k][:w].mean()):9.4f} -> {float(ds[k][-w:].mean()):9.4f}")
    lines.append("  alpha (final)    " + ", ".join(f"{m}: {float(a):.2e}" for m, a in
                                                  zip(ds["matrix"].values, ds["alpha"][-1].values)))
    lines.append("validation (held-out training-split facts): step, ES, PS, NS, edit NLL, loc KL")
    for i, s in enumerate(ds["val_step"].values):
        lines.append(f"  {int(s):5d}  {float(ds.val_es[i]):.3f}  {float(ds.val_ps[i]):.3f}  "
                     f"{float(ds.val_ns[i]):.3f}  {float(ds.val_edit_loss[i]):7.3f}  {float(ds.val_loc_loss[i]):.4f}")
    return "\n".join(lines)


def plot_training_curve(ds: xr.Dataset, axes=None, smooth: int = 20):
    """Loss terms (rolling means) and edit success per step, with the validation points."""
    import matplotlib.pyplot as plt

    if axes is None:
        _, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    roll = lambda k: ds[k].rolling(step=min(smooth, ds.sizes["step"]), min_periods=1).mean()  # noqa: E731
    axes[0].plot(ds.step, roll("edit_loss"), label="train (paraphrases + rewrite)")
    axes[0].plot(ds.val_step, ds.val_edit_loss, "o-", label="validation")
    axes[0].set(xlabel="step", ylabel="NLL of new target", title="edit loss")
    axes[1].plot(ds.step, roll("loc_loss"), label="train")
    axes[1].plot(ds.val_step, ds.val_loc_loss, "o-", label="validation (own neighborhood prompts)")
    axes[1].set(xlabel="step", ylabel="KL(orig || edited)", title="locality loss", yscale="log")
    axes[2].plot(ds.step, roll("edit_success"), label="train PS")
    axes[2].plot(ds.val_step, ds.val_ps, "o-", label="val PS")
    axes[2].plot(ds.val_step, ds.val_es, "s--", label="val ES")
    axes[2].plot(ds.val_step, ds.val_ns, "^:", label="val NS")
    axes[2].set(xlabel="step", ylabel="share", title="edit success", ylim=(-0.02, 1.02))
    for ax in axes:
        ax.legend(fontsize=7)
    axes[0].figure.tight_layout()
    return axes


def efficacy_table(lm: LoadedModel, nets: dict[str, MENDNet], hparams: MENDHyperParams, records: list[Record],
                   progress: bool = False):
    """Single-edit ES/PS/NS (means over ``records``) of each network, edited through :class:`MEND`."""
    import pandas as pd

    rows = {}
    for name, net in nets.items():
        scores = edit_efficacy(lm, MEND(lm, hparams, net=net), records, progress=progress)
        rows[name] = {k: float(np.nanmean(v)) for k, v in scores.items()} | {"n_facts": len(records)}
    return pd.DataFrame(rows).T
