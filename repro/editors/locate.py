"""Plumbing shared by the locate-and-edit editors: the keys of a matrix at the subject's last
token (prompt batches with subject positions come from :mod:`repro.core.scoring`), random context prefixes, and the optimisation of the
target value v* (the vector the edited matrix must output for the subject).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch

from repro.core.hooks import StopForward, capture, edit_output
from repro.core.models import LoadedModel
from repro.core.scoring import PromptBatch, encode_rows, fill, logprobs_at, make_batch, row_nll, target_ids
from repro.editors.base import EARLY_STOPS, KL_FORMS, MPES_ROWS, WEIGHT_DECAY_FORMS
from repro.editors.prefix import frozen_prefix, select_rows


@torch.no_grad()
def subject_keys(lm: LoadedModel, layer: int, mtype: str, templates: list[str], subject: str) -> torch.Tensor:
    """Input of matrix ``mtype`` at the subject's last token, one row per filled template."""
    batch = make_batch(lm, templates, subject)
    module = lm.spec.matrix_module(lm.model, layer, mtype)
    with capture({"k": module}, what="input", stop_after="k") as got:
        try:
            lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        except StopForward:
            pass
    rows = torch.arange(batch.input_ids.shape[0], device=lm.device)
    return got["k"][rows, batch.subject_idx]


@torch.no_grad()
def context_templates(
    lm: LoadedModel, seed: int, lengths: tuple[tuple[int, int], ...] = ((5, 5), (5, 10))
) -> list[str]:
    """``{}`` plus short model-generated prefixes ("<prefix>. {}"), deterministic for a seed.

    ``lengths`` holds (how many, tokens each): each prefix is sampled (top-5) from one of the start
    words "The", "Therefore", "Because", "I", "You" in turn, up to that many tokens in all, start
    word included, as the authors' ``generate_fast(..., max_out_len=length)`` does. Averaging keys
    over such prefixes makes the key describe the subject rather than one exact prompt (ROME, Meng
    et al. 2022).
    """
    tok, model = lm.tokenizer, lm.model
    starts = ["The", "Therefore", "Because", "I", "You"]
    out = ["{}"]
    with torch.random.fork_rng(devices=[lm.device] if lm.device.type == "cuda" else []):
        torch.manual_seed(seed)
        for count, n_tokens in lengths:
            for i in range(count):
                enc = tok(starts[i % len(starts)], return_tensors="pt").to(lm.device)
                gen = model.generate(
                    **enc, max_new_tokens=max(1, n_tokens - enc["input_ids"].shape[1]), do_sample=True, top_k=5,
                    temperature=1.0, top_p=1.0,  # plain top-5 sampling, whatever the model's generation config
                    pad_token_id=tok.pad_token_id,
                )
                text = tok.decode(gen[0], skip_special_tokens=True)
                text = " ".join(text.replace("{", " ").replace("}", " ").split())
                out.append(text + ". {}")
    return out


class SampledPrefixes:
    """For locate-and-edit editors (ROME and MEMIT families; put before ``Editor`` in the bases):
    ``templates``, the context prefixes of :func:`context_templates` drawn once from the editor's
    ``hp.seed``, ``hp.n_prefix_short`` and ``hp.n_prefix_long``, and kept in the editor's state.
    They are sampled with the random stream of the model's device, so a run resumed on another
    device keeps the ones it started with instead of drawing new ones."""

    _templates: list[str] | None = None

    @property
    def templates(self) -> list[str]:
        if self._templates is None:
            hp = self.hp
            self._templates = context_templates(
                self.lm, hp.seed, ((hp.n_prefix_short, 5), (hp.n_prefix_long, 10))
            )
        return self._templates

    def template_groups(self) -> list[tuple[int, int]]:
        """[start, end) of each kind of template in :attr:`templates`: the plain ``{}``, the short
        prefixes, the long prefixes (kinds without templates left out). MEMIT's ``compute_ks``
        averages a key within each kind, then over the kinds."""
        hp, groups, start = self.hp, [], 0
        for size in (1, hp.n_prefix_short, hp.n_prefix_long):
            if size:
                groups.append((start, start + size))
                start += size
        if start != len(self.templates):
            raise ValueError(f"{len(self.templates)} context templates do not match n_prefix_short="
                             f"{hp.n_prefix_short} and n_prefix_long={hp.n_prefix_long} (+ the plain one)")
        return groups

    def state_dict(self) -> dict:
        return {"templates": list(self.templates), **super().state_dict()}

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        templates = state.pop("templates", None)
        super().load_state_dict(state)
        if templates is not None:
            self._templates = list(templates)


FORMER_VALUES = ("the package's former value optimisation (weight decay ‖δ‖²/‖v‖², KL(initial‖current) at the "
                 "prompt's last token, stopping on the NLL alone; other context templates)")


def value_form(hparams: dict) -> str | None:
    """How a run's editor optimised its values, from the hyperparameters its file records: None for
    an editor without a value optimisation, "published" for the authors' objective and loop, and
    "former" for the package's first forms (files written before the forms were named record none
    of them, and were all made with the former ones)."""
    if "v_steps" not in hparams:
        return None
    published = (hparams.get("v_weight_decay_form") == "norm" and hparams.get("kl_form") == "published"
                 and hparams.get("early_stop") in ("loss", "mpes"))
    return "published" if published else "former"


def value_options(hp) -> dict:
    """The value-optimisation settings of an editor's hyperparameters, as :func:`optimize_values`
    takes them (ROME's ``v_*`` names mapped to its own)."""
    return dict(
        steps=hp.v_steps, lr=hp.v_lr, weight_decay=hp.v_weight_decay, kl_factor=hp.kl_factor,
        clamp_norm_factor=hp.clamp_norm_factor, nll_stop=hp.nll_stop, early_stop=hp.early_stop,
        mpes_extra_steps=hp.mpes_extra_steps, loss_stop=hp.loss_stop,
        weight_decay_form=hp.v_weight_decay_form, kl_form=hp.kl_form, mpes_rows=hp.mpes_rows,
    )


@dataclass
class ValueResult:
    v_star: torch.Tensor  # target output of the matrix at the subject's last token
    v_init: torch.Tensor  # its output before the edit (plain prompt)
    steps: int
    nll_first: float
    nll_last: float


@dataclass
class ValueRequest:
    """One request of :func:`optimize_values`: already-composed prompts with one ``{}`` for the
    subject each (the first is the plain prompt whose output is v), the subject and the target."""

    templates: list[str]
    subject: str
    target: str


def optimize_value(
    lm: LoadedModel, layer: int, mtype: str, templates: list[str], subject: str, target: str, **options
) -> ValueResult:
    """v* of one request: :func:`optimize_values` with a single request (ROME, r-ROME, and the
    batch editors with ``batch_values: false``); ``options`` as there."""
    return optimize_values(lm, layer, mtype, [ValueRequest(templates, subject, target)], **options)[0]


def optimize_values(
    lm: LoadedModel,
    layer: int,
    mtype: str,
    requests: list[ValueRequest],
    *,
    steps: int,
    lr: float,
    weight_decay: float,
    kl_factor: float,
    clamp_norm_factor: float,
    nll_stop: float = 0.05,
    kl_template: str = "{} is a",
    early_stop: str = "loss",
    mpes_extra_steps: int = 0,
    loss_stop: float = 0.05,
    weight_decay_form: str = "norm",
    kl_form: str = "published",
    mpes_rows: str = "prefixed",
    module: torch.nn.Module | None = None,
    reuse_prefix: bool = False,
    max_requests: int | None = None,
    drop_finished: bool = True,
) -> list[ValueResult]:
    """For each request find v* = v + δ: adding δ to the matrix output at the subject's last token
    makes the model predict the target after every template (mean token NLL), while keeping the
    next-token distribution of ``kl_template`` close (KL) and δ small (weight decay relative to ‖v‖,
    norm clamp ‖δ‖ ≤ ``clamp_norm_factor``·‖v‖ after every step).

    ``module`` is where δ is added (default: the output of matrix ``mtype`` at ``layer``;
    MEMIT-style editors pass the whole decoder layer, so v is the residual stream there).

    The defaults are the authors' objective (``compute_v`` of ROME, Meng et al. 2022, and
    ``compute_z`` of MEMIT and its successors), term for term:

    - loss = mean over templates of the mean target-token NLL
      + ``kl_factor``·KL(current ‖ initial) of the next-token distribution at the subject's last
      token of ``kl_template`` + ``weight_decay``·‖δ‖/‖v‖²;
    - ``early_stop="loss"``: a loop of ``steps`` forward passes that ends, before stepping, once the
      total loss is below ``loss_stop`` (5e-2 in the authors' code) and takes no step after the last
      pass (so at most ``steps`` − 1 Adam steps).

    Named deviations, each off by default: ``weight_decay_form="squared"`` (‖δ‖²/‖v‖², the form this
    package used first), ``kl_form="former"`` (KL(initial ‖ current) at the last token of
    ``kl_template``), ``early_stop="nll"`` (end once the mean target NLL is below ``nll_stop``,
    checked before the step, at most ``steps`` Adam steps).

    ``early_stop="mpes"`` is most-probable early stopping (ENCORE, Gupta et al. 2025), on top of the
    published loop (the ``loss_stop`` break and the last pass without a step stay): a counter adds
    one at every pass where each target token is the most probable token at its position on every
    counted template (``mpes_rows="prefixed"``: the templates with a generated prefix, not the plain
    prompt, as in ENCORE's code; ``"all"``: every template), and the loop ends, before stepping, at
    the pass where the counter reaches ``mpes_extra_steps`` + 1. The counter is never reset.

    All requests are optimised jointly, one forward and one backward pass per step over all their
    prompts: each request has its own δ row, which enters only its own prompts' rows; the loss is
    the sum of the requests' own losses, so each row's gradient, Adam trajectory (element-wise),
    clamp and stopping are those of optimising the request alone; results equal the one-by-one
    results up to float rounding. A request that has stopped keeps its δ exactly (its parameter
    gets no gradient, so Adam skips it) and, with ``drop_finished``, its rows leave the batch, so it
    costs nothing further. ``max_requests`` caps how many requests share one batch (memory: the
    backward keeps every layer above the edit's activations for all rows); the groups, formed from
    requests of similar prompt length, run one after another.

    ``reuse_prefix``: compute the layers below the one δ enters once, not at every step
    (:func:`repro.editors.prefix.frozen_prefix`); the result is the same up to float rounding.
    The model's weights get no gradients meanwhile (``requires_grad`` is switched off and back).
    """
    for name, value, allowed in (("early_stop", early_stop, EARLY_STOPS),
                                 ("weight_decay_form", weight_decay_form, WEIGHT_DECAY_FORMS),
                                 ("kl_form", kl_form, KL_FORMS), ("mpes_rows", mpes_rows, MPES_ROWS)):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    size = max_requests or len(requests)
    order = list(range(len(requests)))
    if size < len(requests):  # groups of similar length pad less
        order.sort(key=lambda i: _longest_row(lm, requests[i], kl_template))
    out: list[ValueResult | None] = [None] * len(requests)
    with weights_frozen(lm.model):
        for start in range(0, len(requests), size):
            group = order[start:start + size]
            found = _optimize_group(
                lm, layer, mtype, [requests[i] for i in group], steps=steps, lr=lr,
                weight_decay=weight_decay, kl_factor=kl_factor, clamp_norm_factor=clamp_norm_factor,
                nll_stop=nll_stop, kl_template=kl_template, early_stop=early_stop,
                mpes_extra_steps=mpes_extra_steps, module=module, reuse_prefix=reuse_prefix,
                drop_finished=drop_finished, loss_stop=loss_stop, weight_decay_form=weight_decay_form,
                kl_form=kl_form, mpes_rows=mpes_rows,
            )
            for i, res in zip(group, found, strict=True):
                out[i] = res
    return out


def _longest_row(lm: LoadedModel, req: ValueRequest, kl_template: str) -> int:
    """Tokens in the longest prompt of a request, target included (for grouping by length)."""
    texts = [fill(t, req.subject)[0] for t in req.templates + [kl_template]]
    longest = max(len(ids) for ids in lm.tokenizer(texts)["input_ids"])
    return longest + len(target_ids(lm.tokenizer, req.target)) - 1


@contextmanager
def weights_frozen(model: torch.nn.Module) -> Iterator[None]:
    """Switch ``requires_grad`` off on every parameter that has it on, and back on afterwards.

    Only δ is trained in a value optimisation; a weight left trainable would make every backward
    also compute (and accumulate) a gradient nobody reads, and a backward that needs activation
    gradients only is about half as costly as one that also needs weight gradients."""
    on = [p for p in model.parameters() if p.requires_grad]
    for p in on:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in on:
            p.requires_grad_(True)


@dataclass
class _Rows:
    """The rows of a joint batch that one forward pass runs: those of the requests still active."""

    active: list[int]  # request indices, in row order
    batch: PromptBatch
    positions: torch.Tensor  # (B, L): where log-probs are read (targets; last token of KL rows)
    mask: torch.Tensor  # (B, T, 1): 1 at each row's subject last token
    owner: torch.Tensor  # (B,): position in ``active`` of the request each row belongs to
    spans: list[tuple[int, int]]  # per active request: rewrite rows [a, b), its KL row is b


def _take_rows(batch: PromptBatch, idx: torch.Tensor, length: int) -> PromptBatch:
    return PromptBatch(
        batch.input_ids[idx, :length], batch.attention_mask[idx, :length], batch.subject_idx[idx],
        batch.loss_pos[idx], batch.labels[idx], batch.label_mask[idx], batch.last_idx[idx],
    )


def _optimize_group(lm, layer, mtype, requests, *, steps, lr, weight_decay, kl_factor, clamp_norm_factor,
                    nll_stop, kl_template, early_stop, mpes_extra_steps, module, reuse_prefix,
                    drop_finished, loss_stop, weight_decay_form, kl_form, mpes_rows) -> list[ValueResult]:
    """:func:`optimize_values` on one batch of requests (see there)."""
    n, dev = len(requests), lm.device
    # each request's rows: its rewrite prompts (with the target), then its KL prompt (no target)
    texts, targets, spans, starts, n_rows = [], [], [], [], []
    for req in requests:
        starts.append(len(texts))
        prompts = req.templates + [kl_template]
        for j, template in enumerate(prompts):
            text, span = fill(template, req.subject)
            texts.append(text)
            spans.append(span)
            targets.append(req.target if j < len(req.templates) else None)
        n_rows.append(len(prompts))
    full = encode_rows(lm, texts, targets, spans)
    kl_rows = torch.tensor([s + r - 1 for s, r in zip(starts, n_rows)], device=dev)
    full_positions = full.loss_pos.clone()
    # the KL is read at the subject's last token of the KL prompt (published) or at its last token
    full_positions[kl_rows, 0] = (full.subject_idx if kl_form == "published" else full.last_idx)[kl_rows]
    module = module if module is not None else lm.spec.matrix_module(lm.model, layer, mtype)
    d_out = lm.spec.weight(lm.model, layer, mtype).shape[0]
    # one δ per request (an (n, d) matrix split into rows): Adam is element-wise, and a row that gets
    # no gradient (a stopped request) is skipped by it, state and value untouched
    deltas = [torch.zeros(d_out, device=dev, requires_grad=True) for _ in range(n)]
    opt = torch.optim.Adam(deltas, lr=lr)
    stand_ins: list[torch.nn.Module] = []

    def rows_of(active: list[int]) -> _Rows:
        if len(active) == n:
            batch, positions = full, full_positions
            select_rows(stand_ins, None)
        else:
            idx = torch.cat([torch.arange(starts[i], starts[i] + n_rows[i], device=dev) for i in active])
            length = int(full.last_idx[idx].max()) + 1  # drop the columns only finished rows used
            batch, positions = _take_rows(full, idx, length), full_positions[idx]
            select_rows(stand_ins, idx, length)
        mask = torch.zeros(batch.input_ids.shape, device=dev)
        mask[torch.arange(mask.shape[0], device=dev), batch.subject_idx] = 1.0
        owner, local, a = [], [], 0
        for k, i in enumerate(active):
            owner += [k] * n_rows[i]
            local.append((a, a + n_rows[i] - 1))
            a += n_rows[i]
        return _Rows(active, batch, positions, mask.unsqueeze(-1), torch.tensor(owner, device=dev), local)

    state: dict[str, object] = {"stopped": set()}

    def add_delta(out):
        if "v_init" not in state:  # first pass: δ = 0, the output is v (each request's plain prompt)
            first = torch.tensor(starts, device=dev)
            state["v_init"] = out[first, full.subject_idx[first]].detach().clone()
        cur: _Rows = state["rows"]
        if len(cur.active) == 1:
            shift = deltas[cur.active[0]]
        else:
            shift = torch.stack([deltas[i].detach() if i in state["stopped"] else deltas[i]
                                 for i in cur.active])[cur.owner].unsqueeze(1)
        return out + (cur.mask * shift).to(out.dtype)  # δ and its optimiser state stay fp32

    stack = ExitStack()
    if reuse_prefix:
        layers = lm.spec.layer_modules(lm.model)
        whole_layer = module is layers[layer]
        stand_ins = stack.enter_context(frozen_prefix(
            lm, {"input_ids": full.input_ids, "attention_mask": full.attention_mask},
            layer + 1 if whole_layer else layer,
        ))
        if whole_layer:
            module = stand_ins[layer]
    with stack:
        state["rows"] = rows_of(list(range(n)))
        done = _optimize_loop(lm, module, add_delta, deltas, opt, state, rows_of, steps=steps,
                              kl_factor=kl_factor, weight_decay=weight_decay,
                              clamp_norm_factor=clamp_norm_factor, nll_stop=nll_stop,
                              early_stop=early_stop, mpes_extra_steps=mpes_extra_steps,
                              drop_finished=drop_finished, loss_stop=loss_stop,
                              weight_decay_form=weight_decay_form, kl_form=kl_form,
                              mpes_from=1 if mpes_rows == "prefixed" else 0)
    v_init = state["v_init"]
    return [ValueResult(v_init[i] + deltas[i].detach(), v_init[i].clone(), *done[i]) for i in range(n)]


def _optimize_loop(lm, module, add_delta, deltas, opt, state, rows_of, *, steps, kl_factor, weight_decay,
                   clamp_norm_factor, nll_stop, early_stop, mpes_extra_steps, drop_finished, loss_stop,
                   weight_decay_form, kl_form, mpes_from):
    """The Adam steps of :func:`_optimize_group`; returns (passes, nll_first, nll_last) per request,
    passes being the forward passes it took part in before it stopped."""
    n = len(deltas)
    kl_ref: dict[int, torch.Tensor] = {}
    nll_first = [float("nan")] * n
    nll_last = [float("nan")] * n
    taken = [steps] * n  # forward passes until stopping (``steps`` if it never stopped)
    top1_count = [0] * n  # MPES: passes at which every counted target token was the most probable
    stopped: set[int] = state["stopped"]
    published_loop = early_stop != "nll"  # the authors' loop: no step after the last pass
    for step in range(steps):
        rows: _Rows = state["rows"]
        opt.zero_grad()
        with edit_output(module, add_delta):
            logp = logprobs_at(lm, rows.batch, rows.positions)
        b = rows.batch
        nll_ts = [row_nll(logp[a:kl_row], b.labels[a:kl_row], b.label_mask[a:kl_row]).mean()
                  for a, kl_row in rows.spans]
        nlls = torch.stack(nll_ts).tolist()
        if early_stop == "mpes":
            with torch.no_grad():
                hit = ((logp.argmax(-1) == b.labels) | (b.label_mask == 0)).all(1)
                # the counted rewrite rows: the prefixed templates (or all, with one template only)
                all_top1 = [bool(hit[a + mpes_from if kl_row - a > mpes_from else a:kl_row].all())
                            for a, kl_row in rows.spans]
        losses, going = [], []
        for k, (i, (a, kl_row)) in enumerate(zip(rows.active, rows.spans)):
            if i in stopped:  # only with drop_finished=False: its rows still run, frozen
                continue
            kl_lp = logp[kl_row:kl_row + 1, 0]
            if step == 0:
                kl_ref[i] = kl_lp.detach()
                nll_first[i] = nlls[k]
            nll_last[i] = nlls[k]
            if early_stop == "nll" and nlls[k] < nll_stop:  # the former rule: NLL alone, before the loss
                taken[i] = step + 1
                stopped.add(i)
                continue
            if kl_form == "published":  # KL(current ‖ initial)
                kl = torch.nn.functional.kl_div(kl_ref[i], kl_lp, log_target=True, reduction="batchmean")
            else:  # KL(initial ‖ current)
                kl = torch.nn.functional.kl_div(kl_lp, kl_ref[i], log_target=True, reduction="batchmean")
            v_norm = state["v_init"][i].norm()
            d_norm = deltas[i].norm()
            decay = d_norm / v_norm**2 if weight_decay_form == "norm" else d_norm**2 / v_norm**2
            loss = nll_ts[k] + kl_factor * kl + weight_decay * decay
            if published_loop:
                if early_stop == "mpes" and all_top1[k]:
                    top1_count[i] += 1
                if (float(loss.detach()) < loss_stop or step == steps - 1
                        or (early_stop == "mpes" and top1_count[i] > mpes_extra_steps)):
                    taken[i] = step + 1
                    stopped.add(i)
                    continue
            losses.append(loss)
            going.append(i)
        if not going:
            break
        total = losses[0]
        for extra in losses[1:]:
            total = total + extra
        total.backward()
        for i in stopped:  # no gradient at all (not a zero one): Adam leaves the parameter alone
            deltas[i].grad = None
        opt.step()
        with torch.no_grad():
            for i in going:
                limit = clamp_norm_factor * state["v_init"][i].norm()
                if deltas[i].norm() > limit:
                    deltas[i].mul_(limit / deltas[i].norm())
        if drop_finished and len(going) < len(rows.active):
            state["rows"] = rows_of(going)
    return [(taken[i], nll_first[i], nll_last[i]) for i in range(n)]
