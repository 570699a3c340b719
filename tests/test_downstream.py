"""Downstream measurements: task files, few-shot scoring with a cached prefix, fact recall and
perplexity. Tiny random models (with the real SmolLM2 tokenizer) except where marked."""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from repro.data import load_records
from repro.data.tasks import Example, FewShotTask, load_task, parse_task, save_task, split_balanced, task_names
from repro.measure import downstream as ds
from repro.measure.checkpoint import MeasureParams
from repro.core.models import LoadedModel

REPO = Path(__file__).resolve().parents[1]


def _task(**kw) -> FewShotTask:
    base = dict(
        name="toy", description="toy task", source="hand-made", license="CC0", instruction="Label each item.",
        template="Item: {text}\nLabel:", separator="\n\n", labels=("plausible", "implausible"),
        verbalizers={"plausible": " plausible", "implausible": " implausible"},  # 1 and 3 tokens
        chance=0.5, seed=0,
        few_shot=(Example("a cat sat", "plausible"), Example("a rock sang", "implausible")),
        test=(Example("dogs bark", "plausible"), Example("fish fly", "implausible"),
              Example("birds sing", "plausible"), Example("stones talk", "implausible")),
    )
    base.update(kw)
    return FewShotTask(**base)


class _BosTok:
    """A tokenizer that, like Gemma's, opens every text with a ``<bos>`` token unless told not to."""

    def __init__(self, tok, bos: int) -> None:
        self.tok, self.bos, self.pad_token_id = tok, bos, tok.pad_token_id

    def __call__(self, text, add_special_tokens=True, **kw):
        out = dict(self.tok(text, add_special_tokens=False, **kw))
        if add_special_tokens:
            out["input_ids"] = [self.bos] + list(out["input_ids"])
        return out


def _by_hand(lm: LoadedModel, task: FewShotTask, start: tuple[int, ...] = ()) -> np.ndarray:
    """Sum of verbalizer token log-probs after the full prompt text, one unbatched pass per label."""
    tok = lm.tokenizer
    out = np.zeros((len(task.test), len(task.labels)))
    for e, ex in enumerate(task.test):
        prompt = list(start) + tok(task.prompt(ex.text), add_special_tokens=False)["input_ids"]
        for j, label in enumerate(task.labels):
            verb = tok(task.verbalizers[label], add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = lm.model(torch.tensor([prompt + verb])).logits[0]
            lp = torch.log_softmax(logits.float(), -1)
            out[e, j] = sum(lp[len(prompt) - 1 + i, t].item() for i, t in enumerate(verb))
    return out


# ---------------------------------------------------------------------------------------------
# scoring with the cached prefix
# ---------------------------------------------------------------------------------------------
def test_cached_prefix_equals_full_prompt(tiny_lm) -> None:
    task = _task()
    assert len(tiny_lm.tokenizer(" implausible", add_special_tokens=False)["input_ids"]) > 1
    want = _by_hand(tiny_lm, task)
    for batch_size in (1, 3, 64):  # rows split across batches of different padding
        got = ds.label_logprobs(tiny_lm, task, batch_size=batch_size)
        np.testing.assert_allclose(got, want, atol=1e-4)
    np.testing.assert_allclose(ds.label_logprobs(tiny_lm, task, cache_prefix=False), want, atol=1e-4)
    mean = ds.label_logprobs(tiny_lm, task, reduce="mean")
    n_tok = np.array([len(tiny_lm.tokenizer(task.verbalizers[x], add_special_tokens=False)["input_ids"])
                      for x in task.labels])
    np.testing.assert_allclose(mean, want / n_tok, atol=1e-4)


@pytest.mark.parametrize("family", ["gemma3", "gpt2"])
def test_cached_prefix_other_families(make_tiny, family) -> None:
    lm = make_tiny(family, n_layers=3 if family == "gemma3" else 2, sliding_window=8, n_positions=512)
    task = _task()  # the prefix is longer than gemma3's sliding window of 8 tokens
    assert len(lm.tokenizer(task.prefix())["input_ids"]) > 8
    np.testing.assert_allclose(ds.label_logprobs(lm, task, batch_size=3), _by_hand(lm, task), atol=1e-4)


def test_bos_opens_the_prompt_and_each_window(tiny_lm) -> None:
    bos = 7
    lm = dataclasses.replace(tiny_lm, tokenizer=_BosTok(tiny_lm.tokenizer, bos))
    assert ds.start_ids(lm.tokenizer) == [bos] and ds.start_ids(tiny_lm.tokenizer) == []
    task = _task()
    np.testing.assert_allclose(ds.label_logprobs(lm, task, batch_size=3), _by_hand(lm, task, (bos,)), atol=1e-4)
    chunks = ds.text_chunks(lm.tokenizer, ["one two three four five six seven eight nine ten"], 100, ctx=4)
    assert (chunks[:, 0] == bos).all() and chunks.shape[1] == 5
    assert torch.equal(chunks[:, 1:], ds.text_chunks(tiny_lm.tokenizer, ["one two three four five six seven eight "
                                                                         "nine ten"], 100, ctx=4))


def test_expand_cache_leaves_the_prefix_alone(tiny_lm) -> None:
    cache = ds.encode_prefix(tiny_lm, [1, 2, 3, 4])
    before = [layer.keys.clone() for layer in cache.layers]
    big = ds.expand_cache(cache, 5)
    ids = torch.ones((5, 2), dtype=torch.long)
    ds._forward_hidden(tiny_lm, ids, torch.ones_like(ids), big, 4)
    assert all(torch.equal(b, layer.keys) for b, layer in zip(before, cache.layers))
    assert cache.get_seq_length() == 4 and big.get_seq_length() == 6


def test_suffix_tokenizes_like_the_full_prompt(tiny_lm) -> None:
    """The committed tasks cut the prompt where the SmolLM2 tokenizer does not merge across the cut."""
    tok = tiny_lm.tokenizer
    for name in task_names():
        task = load_task(name)
        prefix = tok(task.prefix(), add_special_tokens=False)["input_ids"]
        for ex in task.test[:50]:
            full = tok(task.prompt(ex.text), add_special_tokens=False)["input_ids"]
            assert full == prefix + tok(task.suffix(ex.text), add_special_tokens=False)["input_ids"], (name, ex)


# ---------------------------------------------------------------------------------------------
# accuracy on known answers
# ---------------------------------------------------------------------------------------------
def test_accuracy_with_known_answers(tiny_lm, monkeypatch) -> None:
    task = _task()  # gold: plausible, implausible, plausible, implausible
    right = np.array([[0.0, -5], [-5, 0], [0, -5], [-5, 0]])
    monkeypatch.setattr(ds, "label_logprobs", lambda *a, **k: right)
    got = ds.few_shot_accuracy(tiny_lm, task)
    assert got["accuracy"] == got["accuracy_raw"] == 1.0 and got["macro_f1"] == 1.0 and got["chance"] == 0.5
    # every answer "plausible" by a wide margin: raw accuracy 0.5 with F1 (2/3 + 0)/2;
    # batch calibration removes the shared offset and recovers the ranking
    biased = right + np.array([[20.0, 0.0]])
    monkeypatch.setattr(ds, "label_logprobs", lambda *a, **k: biased)
    got = ds.few_shot_accuracy(tiny_lm, task)
    assert got["accuracy_raw"] == 0.5 and got["macro_f1_raw"] == pytest.approx(1 / 3)
    assert got["accuracy"] == 1.0
    wrong = -right
    monkeypatch.setattr(ds, "label_logprobs", lambda *a, **k: wrong)
    assert ds.few_shot_accuracy(tiny_lm, task)["accuracy"] == 0.0


class _Boost(torch.nn.Module):
    """An unembedding that adds a large constant to one token's logit."""

    def __init__(self, head: torch.nn.Module, token: int) -> None:
        super().__init__()
        self.head, self.token = head, token

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.head(hidden).clone()
        out[..., self.token] += 100.0
        return out


def test_forced_label_is_found(tiny_lm) -> None:
    """A model whose unembedding forces the first label's verbalizer answers it for every example."""
    task = _task(verbalizers={"plausible": " yes", "implausible": " no"})
    (yes,) = tiny_lm.tokenizer(" yes", add_special_tokens=False)["input_ids"]
    model = copy.deepcopy(tiny_lm.model)
    model.lm_head = _Boost(model.lm_head, yes)
    lm = dataclasses.replace(tiny_lm, model=model)
    scores = ds.label_logprobs(lm, task)
    assert (scores[:, 0] > -1e-3).all() and (scores[:, 1] < -50).all()
    got = ds.few_shot_accuracy(lm, task)
    assert got["accuracy_raw"] == 0.5 and got["macro_f1_raw"] == pytest.approx(1 / 3)


def test_batch_calibrate() -> None:
    s = np.log(np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4]]))
    cal = ds.batch_calibrate(s)
    assert (cal.argmax(1) == np.array([0, 0, 1, 1])).all()  # prior 0.75/0.25
    np.testing.assert_allclose(ds.batch_calibrate(s + 3.0), cal)  # invariant to a shift per example


def test_macro_f1() -> None:
    gold = np.array([0, 0, 1, 1, 2])
    assert ds.macro_f1(gold, gold, 3) == 1.0
    pred = np.array([0, 1, 1, 1, 1])  # class 0: tp 1, fn 1 -> 2/3; class 1: tp 2, fp 2 -> 2/3; class 2: 0
    assert ds.macro_f1(gold, pred, 3) == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)


# ---------------------------------------------------------------------------------------------
# perplexity and recall
# ---------------------------------------------------------------------------------------------
def test_perplexity_by_hand(tiny_lm) -> None:
    texts = ["The cat sat on the mat.", "Paris is the capital of France.", "One two three four five six."]
    tok = tiny_lm.tokenizer
    stream = []
    for t in texts:
        stream += tok(t + "\n\n", add_special_tokens=False)["input_ids"]
    ctx = 7
    n = len(stream) // ctx
    nll = []
    for i in range(n):
        ids = torch.tensor([stream[i * ctx : (i + 1) * ctx]])
        with torch.no_grad():
            lp = torch.log_softmax(tiny_lm.model(ids).logits[0, :-1].float(), -1)
        nll += [-lp[j, ids[0, j + 1]].item() for j in range(ctx - 1)]
    want = math.exp(sum(nll) / len(nll))
    assert ds.perplexity(tiny_lm, texts, max_tokens=10_000, ctx=ctx, batch_size=2) == pytest.approx(want, rel=1e-5)
    chunks = ds.text_chunks(tok, texts, max_tokens=10, ctx=4)  # budget cuts to whole windows
    assert chunks.shape == (2, 4) and chunks.flatten().tolist() == stream[:8]
    assert ds.text_chunks(tok, texts[:1], max_tokens=100, ctx=500).shape[0] == 1  # shorter than ctx


def test_fact_recall(tiny_lm, monkeypatch) -> None:
    records = load_records(REPO / "data" / "facts" / "smollm2-135m.json")[:3]
    want_new, want_true = ds.compare_targets(
        tiny_lm, [r.requested_rewrite.prompt.format(r.requested_rewrite.subject) for r in records],
        [r.requested_rewrite.target_new for r in records], [r.requested_rewrite.target_true for r in records])
    got = ds.fact_recall(tiny_lm, records)
    assert got["recall"] == pytest.approx(np.mean(want_true < want_new))
    assert got["true_nll"] == pytest.approx(np.mean(want_true))
    # recall is the share of records whose true object has the lower NLL
    monkeypatch.setattr(ds, "compare_targets", lambda lm, texts, new, true: (np.array([1.0, 3, 2]), np.array([2.0, 1, 1])))
    got = ds.fact_recall(tiny_lm, records)
    assert got["recall"] == pytest.approx(2 / 3) and got["true_nll"] == pytest.approx(4 / 3)


# ---------------------------------------------------------------------------------------------
# task files
# ---------------------------------------------------------------------------------------------
def test_committed_tasks_parse_and_are_sound() -> None:
    assert set(MeasureParams().tasks) <= set(task_names())  # the tasks runs measure exist
    for name in task_names():
        task = load_task(name)
        assert task.name == name
        assert not {e.text for e in task.few_shot} & {e.text for e in task.test}
        assert len({e.text for e in task.test}) == len(task.test)
        assert task.chance == pytest.approx(1 / len(task.labels))
        for part in (task.few_shot, task.test):
            counts = [sum(e.label == x for e in part) for x in task.labels]
            assert len(set(counts)) == 1, (name, counts)  # balanced
        # any prefix of n_labels * m test examples is balanced
        first = task.test[: len(task.labels)]
        assert sorted(e.label for e in first) == sorted(task.labels)


def test_round_trip_and_by_path(tmp_path) -> None:
    path = tmp_path / "toy.json"
    save_task(_task(), path)
    assert load_task(path) == _task()
    assert load_task("toy", root=tmp_path) == _task()


def _raw() -> dict:
    from repro.data.tasks import task_to_dict

    return task_to_dict(_task())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r.pop("labels"), "'labels'"),
        (lambda r: r.update(labels=["a"]), "'labels'"),
        (lambda r: r.update(template="no placeholder"), "'template'"),
        (lambda r: r.update(verbalizers={"plausible": " p"}), "'verbalizers'"),
        (lambda r: r.update(verbalizers={"plausible": " p", "implausible": " p"}), "'verbalizers'"),
        (lambda r: r.update(chance=1.5), "'chance'"),
        (lambda r: r["test"].append({"text": "x", "label": "maybe"}), "'test[4].label'"),
        (lambda r: r["test"].append({"text": "a cat sat", "label": "plausible"}), "shares 1 text"),
        (lambda r: r["few_shot"].append({"text": "x"}), "'few_shot[2]'"),
        (lambda r: r.update(test=[]), "'test'"),
        (lambda r: r.update(name=3), "'name'"),
    ],
)
def test_malformed_task_raises(tmp_path, change, message) -> None:
    raw = _raw()
    change(raw)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        load_task(path)
    assert str(path) in str(err.value)


def test_unreadable_or_missing_task(tmp_path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_task(bad)
    with pytest.raises(FileNotFoundError, match="build-tasks"):
        load_task("no_such_task")
    with pytest.raises(ValueError, match="must be a JSON object"):
        parse_task([1, 2])


def test_split_balanced() -> None:
    by = {"a": [f"a{i}" for i in range(10)] + ["both"], "b": [f"b{i}" for i in range(10)] + ["both"]}
    pool, test = split_balanced(by, ["a", "b"], 4, 6, seed=1)
    assert len(pool) == 4 and len(test) == 6
    assert "both" not in {e.text for e in pool + test}  # text under two labels dropped
    assert [e.label for e in test] == ["a", "b"] * 3
    assert split_balanced(by, ["a", "b"], 4, 6, seed=1) == (pool, test)
    with pytest.raises(ValueError, match="multiples"):
        split_balanced(by, ["a", "b"], 3, 6, seed=1)
    with pytest.raises(ValueError, match="needed"):
        split_balanced(by, ["a", "b"], 12, 12, seed=1)


# ---------------------------------------------------------------------------------------------
# the real model (a few examples only)
# ---------------------------------------------------------------------------------------------
@pytest.mark.real_model
def test_smollm_cached_prefix_few_examples(smollm) -> None:
    task = load_task("sentiment")
    task = dataclasses.replace(task, few_shot=task.few_shot[:2])  # short prompts: the uncached pass is slow
    cached = ds.label_logprobs(smollm, task, n_test=2)
    full = ds.label_logprobs(smollm, task, n_test=2, cache_prefix=False)
    np.testing.assert_allclose(cached, full, atol=1e-3)
