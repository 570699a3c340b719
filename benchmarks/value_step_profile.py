"""One step of ROME's value optimisation on SmolLM2-135M, against its FLOP count.

A step is a forward pass over the rewrite prompts and the KL prompt with δ added to the edited
matrix's output at the subject's last token (layers below the edit replayed, as with
``reuse_prefix``), the loss, and a backward pass that only needs the gradient of δ: activation
gradients through the layers above the edit, no weight gradients. The script times both halves,
counts their floating-point operations (torch.utils.flop_counter.FlopCounterMode, with an analytic
count of the forward's matrix products from the model config as a cross-check), and sets the
achieved GFLOP/s against a plain large matmul on the same threads (the machine's reference).

It also times the step with the model's weights trainable (``requires_grad=True``): then the
backward computes a gradient for every weight above the edit as well, which the value optimisation
never reads. ``locate.optimize_values`` switches the flags off while it runs (``weights_frozen``;
``load_model`` already returns frozen models, so this guards models loaded any other way).

    OMP_NUM_THREADS=1 python benchmarks/value_step_profile.py [--threads 1] [--reps 5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _median_time(fn, reps: int) -> float:
    """Median CPU seconds of this process per call (time.process_time: other jobs' time slices on
    a shared machine do not count; with one thread it equals wall time on an idle machine)."""
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t = time.process_time()
        fn()
        times.append(time.process_time() - t)
    return statistics.median(times)


def matmul_reference(n: int, reps: int) -> float:
    """GFLOP/s of an (n, n) @ (n, n) float32 product."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / _median_time(lambda: a @ b, reps) / 1e9


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: as started)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--seed", type=int, default=99, help="which held-out fact")
    args = ap.parse_args(argv)

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from repro.data.counterfact import load_records
    from repro.editors import make_editor
    from repro.core.scoring import make_batch
    from repro.core.scoring import logprobs_at
    from repro.editors.prefix import frozen_prefix
    from repro.data.splits import select_requests
    from repro.core.hooks import edit_output
    from repro.core.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    load0 = os.getloadavg()
    lm = load_model(args.model)
    editor = make_editor("rome", lm)
    hp, layer, mtype = editor.hp, editor.hp.layer, editor.mtype
    req = select_requests(load_records(ROOT / f"data/facts/{args.model}.json"), 1, args.seed)[0]
    prompts = [t.replace("{}", req.prompt) for t in editor.templates]
    batch = make_batch(lm, prompts + ["{} is a"], req.subject, req.target_new, n_plain=1)
    n_rw = len(prompts)
    positions = batch.loss_pos.clone()
    positions[n_rw:, 0] = batch.last_idx[n_rw:]
    module = lm.spec.matrix_module(lm.model, layer, mtype)
    d = lm.spec.weight(lm.model, layer, mtype).shape[0]
    delta = (0.01 * torch.randn(d)).requires_grad_(True)
    mask = torch.zeros(batch.input_ids.shape + (1,))
    mask[torch.arange(mask.shape[0]), batch.subject_idx] = 1.0
    v_norm = torch.tensor(1.0)

    def loss_fn(kl_ref):
        with edit_output(module, lambda out: out + mask * delta):
            logp = logprobs_at(lm, batch, positions)
        tok_lp = logp[:n_rw].gather(-1, batch.labels[:n_rw].unsqueeze(-1)).squeeze(-1)
        lm_ = batch.label_mask[:n_rw]
        nll = -((tok_lp * lm_).sum(1) / lm_.sum(1)).mean()
        kl = torch.nn.functional.kl_div(logp[n_rw:, 0], kl_ref, log_target=True, reduction="batchmean")
        return nll + hp.kl_factor * kl + hp.v_weight_decay * delta.norm() ** 2 / v_norm**2

    rows = {}
    fwd_kwargs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    with frozen_prefix(lm, fwd_kwargs, layer):
        with torch.no_grad(), edit_output(module, lambda out: out + mask * delta):
            kl_ref = logprobs_at(lm, batch, positions)[n_rw:, 0]
        for trainable in (False, True):
            lm.model.requires_grad_(trainable)
            try:
                def fwd():
                    return loss_fn(kl_ref)

                def fwd_bwd():
                    delta.grad = None
                    lm.model.zero_grad(set_to_none=True)
                    fwd().backward()

                t_fwd = _median_time(fwd, args.reps)
                t_both = _median_time(fwd_bwd, args.reps)
                with FlopCounterMode(display=False) as fc:
                    fwd()
                f_fwd = fc.get_total_flops()
                lm.model.zero_grad(set_to_none=True)
                with FlopCounterMode(display=False) as fc:
                    fwd_bwd()
                f_both = fc.get_total_flops()
                weight_grads = sum(p.grad is not None for p in lm.model.parameters())
            finally:
                lm.model.requires_grad_(False)
                lm.model.zero_grad(set_to_none=True)
            rows[trainable] = dict(t_fwd=t_fwd, t_bwd=t_both - t_fwd, f_fwd=f_fwd, f_bwd=f_both - f_fwd,
                                   weight_grads=weight_grads)

    # analytic count of the forward's matrix products: layers layer..n-1 on every (padded) token,
    # attention over all T positions, the unembedding at the B x L read positions
    cfg = lm.model.config
    B, T = batch.input_ids.shape
    L = positions.shape[1]
    h, f = cfg.hidden_size, cfg.intermediate_size
    hd = getattr(cfg, "head_dim", h // cfg.num_attention_heads)
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    per_token = 2 * (h * q + 2 * h * kv + q * h + 3 * h * f) + 2 * 2 * cfg.num_attention_heads * hd * T
    n_above = cfg.num_hidden_layers - layer
    analytic_fwd = n_above * B * T * per_token + 2 * B * L * h * cfg.vocab_size
    ref_big = matmul_reference(2048, 3)
    ref_mlp_a = torch.randn(B * T, h)
    ref_mlp_b = torch.randn(h, f)
    ref_mlp = 2 * B * T * h * f / _median_time(lambda: ref_mlp_a @ ref_mlp_b, 20) / 1e9
    load1 = os.getloadavg()

    print(f"ROME value-optimisation step on {args.model}: edit at layer {layer} ({mtype}), "
          f"{B} prompts x {T} tokens (padded; {int(batch.attention_mask.sum())} real), "
          f"log-probs at {B} x {L} positions; layers below {layer} replayed")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); load average "
          f"{load0[0]:.2f} at start, {load1[0]:.2f} at end (other jobs share this machine's 2 cores)\n")
    print("| weights | pass | CPU seconds (median) | GFLOP | GFLOP/s | weight gradients |")
    print("|---|---|---|---|---|---|")
    for trainable, r in rows.items():
        name = "requires_grad=True" if trainable else "frozen (as optimised)"
        print(f"| {name} | forward | {r['t_fwd']:.3f} | {r['f_fwd'] / 1e9:.2f} | {r['f_fwd'] / 1e9 / r['t_fwd']:.1f} | – |")
        print(f"| {name} | backward | {r['t_bwd']:.3f} | {r['f_bwd'] / 1e9:.2f} | "
              f"{r['f_bwd'] / 1e9 / r['t_bwd']:.1f} | {r['weight_grads']} |")
    fro, tr = rows[False], rows[True]
    print(f"\nforward FLOPs, analytic from the config: {analytic_fwd / 1e9:.2f} GFLOP "
          f"(counted: {fro['f_fwd'] / 1e9:.2f})")
    print(f"backward/forward FLOPs: {fro['f_bwd'] / fro['f_fwd']:.2f} frozen, {tr['f_bwd'] / tr['f_fwd']:.2f} trainable")
    print(f"step (forward + backward): {fro['t_fwd'] + fro['t_bwd']:.3f} s frozen, "
          f"{tr['t_fwd'] + tr['t_bwd']:.3f} s trainable: freezing gains "
          f"{(tr['t_fwd'] + tr['t_bwd']) / (fro['t_fwd'] + fro['t_bwd']):.2f}x "
          f"(backward {tr['t_bwd'] / fro['t_bwd']:.2f}x)")
    print(f"reference: 2048x2048 @ 2048x2048 matmul {ref_big:.1f} GFLOP/s; the MLP's own shape "
          f"({B * T}x{h} @ {h}x{f}) {ref_mlp:.1f} GFLOP/s")
    print(f"the step reaches {100 * (fro['f_fwd'] + fro['f_bwd']) / (fro['t_fwd'] + fro['t_bwd']) / 1e9 / ref_big:.0f} % "
          f"of the large-matmul rate")


if __name__ == "__main__":
    main()
