"""Tests of repro.data: record format, validation, committed facts and text files (no model)."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from repro.data import EditRequest, Record, Rewrite, load_records, load_text, save_records, to_request
from repro.data.build_facts import RELATIONS, valid_objects
from repro.data.counterfact import parse_record, parse_records

REPO = Path(__file__).resolve().parents[1]
FACTS = REPO / "data" / "facts" / "smollm2-135m.json"

ORIGINAL = {  # as in the original CounterFact file (abridged)
    "case_id": 0,
    "pararel_idx": 2796,
    "requested_rewrite": {
        "prompt": "The mother tongue of {} is",
        "relation_id": "P103",
        "target_new": {"str": "English", "id": "Q1860"},
        "target_true": {"str": "French", "id": "Q150"},
        "subject": "Danielle Darrieux",
    },
    "paraphrase_prompts": [
        "Shayna does this and Yossel goes still and dies. Danielle Darrieux, a native",
        "An album was recorded for Capitol Nashville but never released. Danielle Darrieux spoke the language",
    ],
    "neighborhood_prompts": ["The mother tongue of Léon Blum is", "The native language of Montesquieu is"],
    "attribute_prompts": ["J. R. R. Tolkien is a native speaker of"],
    "generation_prompts": ["Danielle Darrieux's mother tongue is"],
}


def _record(case_id: int = 7) -> Record:
    return Record(
        case_id=case_id,
        requested_rewrite=Rewrite("{} is located in the country of", "Vitebsk", "China", "Belarus", "P17"),
        paraphrase_prompts=["It rained. The country of Vitebsk is", "Vitebsk, which is located in"],
        neighborhood_prompts=["Minsk is located in", "The country of Brest is"],
        generation_prompts=["Vitebsk is known for"],
    )


def test_round_trip(tmp_path: Path) -> None:
    records = [_record(7), _record(8)]
    path = tmp_path / "sub" / "facts.json"
    save_records(records, path)
    assert load_records(path) == records
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    raw = json.loads(path.read_text())
    assert raw[0]["requested_rewrite"]["target_new"] == {"str": "China"}


def test_original_counterfact_record_loads(tmp_path: Path) -> None:
    path = tmp_path / "counterfact.json"
    path.write_text(json.dumps([ORIGINAL]))
    (rec,) = load_records(path)
    assert rec.requested_rewrite.target_new == "English"
    assert rec.requested_rewrite.target_true == "French"
    assert rec.relation_id == "P103"
    req = to_request(rec)
    assert req == EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English", "French", 0)
    assert req.text == "The mother tongue of Danielle Darrieux is"


def test_plain_string_targets_and_missing_generation_prompts() -> None:
    raw = copy.deepcopy(ORIGINAL)
    raw["requested_rewrite"]["target_new"] = "German"
    del raw["generation_prompts"]
    rec = parse_record(raw)
    assert rec.requested_rewrite.target_new == "German" and rec.generation_prompts == []


def _broken(path: tuple[str, ...], value: object = None, delete: bool = False) -> dict:
    raw = copy.deepcopy(ORIGINAL)
    raw["case_id"] = 42
    node = raw
    for key in path[:-1]:
        node = node[key]
    if delete:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return raw


@pytest.mark.parametrize(
    "raw, field",
    [
        (_broken(("requested_rewrite", "subject"), delete=True), "subject"),
        (_broken(("requested_rewrite", "prompt"), "The mother tongue of X is"), "prompt"),
        (_broken(("requested_rewrite", "target_new"), {"str": ""}), "target_new"),
        (_broken(("requested_rewrite", "target_true"), {"id": "Q150"}), "target_true"),
        (_broken(("requested_rewrite", "target_new"), {"str": "French"}), "target_new"),
        (_broken(("paraphrase_prompts",), "not a list"), "paraphrase_prompts"),
        (_broken(("neighborhood_prompts",), delete=True), "neighborhood_prompts"),
        (_broken(("neighborhood_prompts",), ["ok", 3]), "neighborhood_prompts[1]"),
        (_broken(("requested_rewrite",), delete=True), "requested_rewrite"),
    ],
)
def test_malformed_record_names_record_and_field(raw: dict, field: str) -> None:
    good = copy.deepcopy(ORIGINAL)
    with pytest.raises(ValueError) as err:
        parse_records([good, raw])
    msg = str(err.value)
    assert "record 1" in msg and "case_id=42" in msg and field in msg


def test_bad_case_ids() -> None:
    with pytest.raises(ValueError, match="case_id"):
        parse_record(_broken(("case_id",), "zero"))
    with pytest.raises(ValueError, match="duplicates"):
        parse_records([ORIGINAL, ORIGINAL])


def test_load_records_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([_broken(("requested_rewrite", "subject"), delete=True)]))
    with pytest.raises(ValueError, match="bad.json"):
        load_records(path)


@pytest.fixture(scope="module")
def facts() -> list[Record]:
    return load_records(FACTS)


def test_committed_facts_size_and_relations(facts: list[Record]) -> None:
    assert len(facts) >= 1000
    assert len({r.relation_id for r in facts}) >= 5
    assert [r.case_id for r in facts] == list(range(len(facts)))


def test_committed_facts_prompts(facts: list[Record]) -> None:
    for rec in facts:
        rw = rec.requested_rewrite
        assert len(rec.paraphrase_prompts) >= 2, rec.case_id
        assert len(rec.neighborhood_prompts) >= 5, rec.case_id
        assert all(rw.subject in p for p in rec.paraphrase_prompts), rec.case_id
        assert rw.target_new != rw.target_true


def test_committed_facts_targets_share_relation(facts: list[Record]) -> None:
    allowed = valid_objects()
    others = set().union(*allowed.values())
    for rec in facts:
        rw = rec.requested_rewrite
        kind = RELATIONS[rec.relation_id or ""].kind
        for target in (rw.target_new, rw.target_true):
            assert target in allowed[kind] if kind in allowed else target not in others, rec.case_id


def test_committed_edited_subjects_are_not_neighbors(facts: list[Record]) -> None:
    hood: dict[str, set[str]] = {}
    for rec in facts:
        hood.setdefault(rec.relation_id or "", set()).update(rec.neighborhood_prompts)
    for rec in facts:
        rel = RELATIONS[rec.relation_id or ""]
        filled = {t.format(rec.requested_rewrite.subject) for t in rel.templates}
        assert not filled & hood[rel.rid], rec.case_id


def test_text_splits() -> None:
    train, test = load_text("train"), load_text("test")
    assert train and test
    assert not set(train) & set(test)
    assert len(train) > len(test)
    assert all("\n" not in p and p.strip() == p for p in train[:100])


def test_unknown_split() -> None:
    with pytest.raises(ValueError, match="split"):
        load_text("validation")


# --------------------------------------------------------------------------------------------
# Builder pieces (no real model)
# --------------------------------------------------------------------------------------------
def test_qa_wikidata_parsing_and_cleaning() -> None:
    from repro.data.build_facts import Fact, clean_facts, qa_wikidata_facts

    task = {"examples": [
        {"input": "The native language of Lionel Messi is", "target": "Spanish"},
        {"input": "The country of citizenship of Fidel Castro is", "target": "Cuba"},
        {"input": "The country of Kumasi is", "target": "Ghana"},
        {"input": "The country of Mexico City is", "target": "Mexico"},  # trivial: dropped
        {"input": "The official language of Albania is", "target": ["Greek", "Albanian"]},  # list
        {"input": "The genre of Weird Al is", "target": "parody"},  # unmapped relation
    ]}
    facts = qa_wikidata_facts(task)
    assert [(f.rid, f.subject, f.obj) for f in facts] == [
        ("P103", "Lionel Messi", "Spanish"), ("P27", "Fidel Castro", "Cuba"), ("P17", "Kumasi", "Ghana"),
        ("P17", "Mexico City", "Mexico")]
    conflict = [Fact("P17", "Kumasi", "Togo", "test")]
    kept = clean_facts(facts + conflict)
    assert {(f.rid, f.subject) for f in kept} == {("P103", "Lionel Messi"), ("P27", "Fidel Castro")}


def test_candidates_put_true_object_first() -> None:
    from repro.data.build_facts import candidates

    ranked = [f"o{i}" for i in range(20)]
    assert candidates("o3", ranked, 5) == ["o3", "o0", "o1", "o2", "o4"]
    assert candidates("rare", ranked, 5) == ["rare", "o0", "o1", "o2", "o3"]


def test_cached_scoring_matches_full_sequences() -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from repro.data.build_facts import _score_batch
    from repro.models import SPECS, LoadedModel

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    tok = type("Tok", (), {"pad_token_id": 0})()
    lm = LoadedModel("tiny", model, tok, SPECS["llama"], torch.device("cpu"))
    prompt = torch.tensor([[5, 6, 7], [8, 9, 10]])
    targets = [[[11], [12, 13, 14]], [[15, 16], [17]]]
    got = _score_batch(lm, prompt, targets)
    with torch.no_grad():
        for b, row in enumerate(targets):
            for c, t in enumerate(row):
                ids = torch.tensor([prompt[b].tolist() + t])
                logp = torch.log_softmax(model(ids).logits[0], -1)
                want = -sum(logp[2 + j, t[j]].item() for j in range(len(t))) / len(t)
                assert got[b][c] == pytest.approx(want, abs=1e-4)


def test_bigbench_link_is_read_from_the_simple_index(monkeypatch):
    import io

    from repro.data import sources

    page = (b'<a href="https://files.example/aa/bigbench-0.0.1.tar.gz#sha256=00">bigbench-0.0.1.tar.gz</a>'
            b'<a href="../../packages/bigbench-1.0.0.tar.gz#sha256=11">bigbench-1.0.0.tar.gz</a>')

    class Resp(io.BytesIO):
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    seen = []
    monkeypatch.setattr(sources.urllib.request, "urlopen", lambda url, timeout=0: seen.append(url) or Resp(page))
    assert sources.tarball_url("https://idx.example/simple/") == "https://idx.example/packages/bigbench-1.0.0.tar.gz"
    assert seen == ["https://idx.example/simple/bigbench/"]
    monkeypatch.setattr(sources.urllib.request, "urlopen", lambda url, timeout=0: Resp(page[:80]))
    with pytest.raises(FileNotFoundError, match="not listed"):
        sources.tarball_url("https://idx.example/simple")
