"""Tests of repro.data: record format, validation, committed facts and text files (no model)."""
from __future__ import annotations

import copy
import json
from collections import Counter
from pathlib import Path

import pytest

from repro.data import EditRequest, Record, Rewrite, load_records, load_text, save_records, to_request
from repro.data.build_facts import RELATIONS, valid_objects
from repro.data.counterfact import parse_record, parse_records

REPO = Path(__file__).resolve().parents[1]
FACTS = REPO / "data" / "facts" / "smollm2-135m.json"
# long-sequence files (preset "long") and the fewest records each must have
LONG_FACTS = {REPO / "data" / "facts" / "smollm2-135m-long.json": 5000,
              REPO / "data" / "facts" / "gemma3-270m-long.json": 1500}

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
        (_broken(("requested_rewrite", "prompt"), "The {kind} tongue of {} is"), "prompt"),
        (_broken(("requested_rewrite", "prompt"), "The mother tongue of {} is {"), "prompt"),
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


def test_invalid_json_and_empty_files_are_named(tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text('[{"case_id": 1,')
    with pytest.raises(ValueError, match=r"broken\.json: not valid JSON"):
        load_records(broken)
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(ValueError, match=r"empty\.json: holds no records"):
        load_records(empty)


@pytest.fixture(scope="module", params=[FACTS, *LONG_FACTS], ids=lambda p: p.stem)
def facts(request) -> list[Record]:
    return load_records(request.param)


@pytest.fixture(scope="module", params=list(LONG_FACTS), ids=lambda p: p.stem)
def long_facts(request) -> tuple[list[Record], int]:
    return load_records(request.param), LONG_FACTS[request.param]


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


def test_long_facts_distinct_subjects_and_size(long_facts: tuple[list[Record], int]) -> None:
    records, least = long_facts
    subjects = [r.requested_rewrite.subject for r in records]
    assert len(records) >= least
    assert len(set(subjects)) == len(subjects)
    assert len({r.relation_id for r in records}) >= 8


def test_long_facts_never_use_an_edited_subject_as_neighbor(long_facts: tuple[list[Record], int]) -> None:
    records, _ = long_facts
    subjects = {r.requested_rewrite.subject for r in records}
    for rid in {r.relation_id for r in records}:
        edited = {t.format(s) for t in RELATIONS[rid or ""].templates for s in subjects}
        for rec in records:
            if rec.relation_id == rid:
                assert not edited & set(rec.neighborhood_prompts), rec.case_id


def test_long_facts_fit_a_3000_edit_run(long_facts: tuple[list[Record], int]) -> None:
    from repro.data.splits import held_out_records, select_records, split_of

    records, least = long_facts
    n = 3000 if least >= 5000 else 1000
    chosen = select_records(records, n, seed=0)
    held = held_out_records(records, chosen, 50, seed=0)
    assert len({r.requested_rewrite.subject for r in chosen}) == n
    assert not {r.requested_rewrite.subject for r in held} & {r.requested_rewrite.subject for r in chosen}
    assert sum(split_of(r) == "eval" for r in records) >= 0.8 * least


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
    from repro.core.models import SPECS, LoadedModel

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


# --------------------------------------------------------------------------------------------
# Presets and the long-sequence builder (no model)
# --------------------------------------------------------------------------------------------
def test_default_preset_is_the_original_build() -> None:
    from repro.data.build_facts import BASE_RELATIONS, MIN_CITY_POPULATION, PRESETS, resolve_preset

    default = PRESETS["default"]
    assert sorted(default.relations) == ["P103", "P1303", "P17", "P27", "P30", "P364", "P37", "P495"]
    assert default.relations == BASE_RELATIONS and MIN_CITY_POPULATION == 300_000
    assert (default.max_checked, default.min_city_population, default.max_records, default.max_per_object,
            default.distinct_subjects, default.suffix) == (1500, 300_000, None, None, False, "")
    long = resolve_preset("long", max_checked=None, max_records=7)  # None keeps the preset's value
    assert long.max_checked is None and long.max_records == 7 and long.distinct_subjects
    assert long.suffix == "-long" and set(BASE_RELATIONS) < set(long.relations)


def test_religion_facts_parse_and_keep_only_listed_religions() -> None:
    from repro.data.build_facts import RELIGIONS, clean_facts, qa_wikidata_facts

    task = {"examples": [
        {"input": "The religion of Aamir Khan is", "target": "Islam"},
        {"input": "The religion of Abbasid Caliphate is", "target": "Islam"},
        {"input": "The religion of AJ Michalka is", "target": "Christianity"},  # contains Catholicism
        {"input": "The religion of Daisy Ridley is", "target": "Jedi"},  # not a listed religion
        {"input": "The religion of Judaism is", "target": "Judaism"},  # trivial
    ]}
    facts = qa_wikidata_facts(task)
    assert [f.rid for f in facts] == ["P140"] * 5
    kept = clean_facts(facts)
    assert sorted((f.subject, f.obj) for f in kept) == [("Aamir Khan", "Islam"), ("Abbasid Caliphate", "Islam")]
    assert "Christianity" not in RELIGIONS and RELATIONS["P140"].kind == "religion"
    assert all(t.count("{}") == 1 for t in RELATIONS["P140"].templates + RELATIONS["P140"].generation)


def test_city_population_threshold() -> None:
    from repro.data.build_facts import geo_facts

    big = {f.subject for f in geo_facts() if f.rid == "P17"}
    more = {f.subject for f in geo_facts(100_000) if f.rid == "P17"}
    assert big < more and len(more) > 2 * len(big)


def test_facts_to_check_samples_per_relation_or_takes_all() -> None:
    from repro.data.build_facts import Fact, facts_to_check

    facts = [Fact(rid, f"s{i}", "o", "test") for rid in ("P17", "P27") for i in range(30)]
    some = facts_to_check(facts, 10, seed=0)
    assert [f.rid for f in some] == ["P17"] * 10 + ["P27"] * 10
    assert some == facts_to_check(facts, 10, seed=0) != facts_to_check(facts, 10, seed=1)
    assert sorted(facts_to_check(facts, None, seed=0), key=lambda f: (f.rid, int(f.subject[1:]))) == facts


def _toy_facts():
    """Two relations over the same people: P27 (two countries) and P103 (one language)."""
    from repro.data.build_facts import Fact

    p27 = [Fact("P27", f"Person {i}", "France" if i < 30 else "Italy", "test") for i in range(40)]
    p103 = [Fact("P103", f"Person {i}", "French", "test") for i in range(0, 40, 2)]
    p103 += [Fact("P103", f"Writer {i}", "French", "test") for i in range(6)]
    cands = {"P27": ["France", "Italy", "Spain"], "P103": ["French", "English", "German"]}
    known = {f: [f.obj] + [c for c in cands[f.rid] if c != f.obj] for f in p27 + p103
             if not f.subject.startswith("Writer")}
    return p27 + p103, known


def test_distinct_subject_records_edit_each_subject_once() -> None:
    from repro.data.build_facts import MIN_NEIGHBORS, distinct_subject_records

    facts, known = _toy_facts()
    records = distinct_subject_records(facts, known, ["P27", "P103"], seed=0)
    subjects = [r.requested_rewrite.subject for r in records]
    assert len(subjects) == len(set(subjects)) and records
    by_rel = {rid: {r.requested_rewrite.subject for r in records if r.relation_id == rid} for rid in ("P27", "P103")}
    # P103 has fewer candidates (10 against 25), so it keeps all of its own; P27 edits none of them
    alone = {r.requested_rewrite.subject for r in distinct_subject_records(facts, known, ["P103"], seed=0)}
    assert by_rel["P103"] == alone and len(alone) == 10 and not by_rel["P27"] & alone
    assert by_rel["P27"] and all(s.startswith("Person") for s in by_rel["P27"])
    for rec in records:
        rel = RELATIONS[rec.relation_id or ""]
        assert len(rec.neighborhood_prompts) >= MIN_NEIGHBORS
        for prompt in rec.neighborhood_prompts:  # a neighbor is never edited, in any relation
            assert not any(prompt == t.format(s) for t in rel.templates for s in subjects), prompt
        rw = rec.requested_rewrite
        assert rw.target_true == next(f.obj for f in facts if (f.rid, f.subject) == (rec.relation_id, rw.subject))
    again = distinct_subject_records(facts, known, ["P103", "P27"], seed=0)
    assert again == records  # deterministic, whatever the relation order given


def test_distinct_subject_records_caps() -> None:
    from repro.data.build_facts import distinct_subject_records

    facts, known = _toy_facts()
    few = distinct_subject_records(facts, known, ["P27", "P103"], seed=0, max_records=3)
    assert Counter(r.relation_id for r in few) == {"P27": 3, "P103": 3}
    capped = distinct_subject_records(facts, known, ["P27"], seed=0, max_per_object=4)
    assert Counter(r.requested_rewrite.target_true for r in capped) == {"France": 4, "Italy": 4}
    # with P27 alone, every known P27 fact not reserved as a neighbor (min(10, half)) is edited
    alone = distinct_subject_records(facts, known, ["P27"], seed=0)
    assert Counter(r.requested_rewrite.target_true for r in alone) == {"France": 30 - 10, "Italy": 10 - 5}
