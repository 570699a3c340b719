"""Parameters in one place: each notebook's parameters cell is its params dataclass (plus the
notebook-only parameters of repro.core.params.NOTEBOOKS), the values are checked before anything loads,
the notebooks nbval re-executes are the smoke profile's instances of notebooks/, and the committed
runs and resume states keep their parameters."""
from __future__ import annotations

import ast
import dataclasses
import json
import typing

import nbformat
import pytest

from repro.core import params as P
from repro import study
from repro.runs.sequential import SequentialParams
from repro.core.paths import ROOT


def parameters_cell(path) -> dict[str, tuple[ast.expr, object]]:
    """name -> (annotation, default) of the notebook's papermill ``parameters`` cell."""
    nb = nbformat.read(path, as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"{path}: one cell tagged 'parameters' expected, found {len(cells)}"
    out = {}
    for node in ast.parse(cells[0].source).body:
        assert isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None, \
            f"{path}: the parameters cell holds only `name: type = value` lines, not {ast.unparse(node)!r}"
        out[node.target.id] = (node.annotation, ast.literal_eval(node.value))
    return out


@pytest.mark.parametrize("notebook", sorted(P.NOTEBOOKS))
def test_parameters_cell_is_the_params_dataclass(notebook):
    cls, extra = P.params_class(notebook)
    cell = parameters_cell(ROOT / notebook)
    want = {**P.defaults(cls), **P.defaults(extra)}
    assert list(cell) == list(want), (f"{notebook}: parameters {sorted(set(cell) ^ set(want))} differ from "
                                      f"{cls.__name__} + {extra.__name__}")
    hints = {**typing.get_type_hints(cls), **typing.get_type_hints(extra)}
    for name, (annotation, default) in cell.items():
        assert default == want[name] and type(default) is type(want[name]), \
            f"{notebook}: {name} defaults to {default!r} in the notebook, {want[name]!r} in {cls.__name__}"
        assert eval(ast.unparse(annotation)) == hints[name], f"{notebook}: {name} is annotated differently"


def test_notebook_only_parameters_are_few():
    extras = {extra for _, extra in P.NOTEBOOKS.values()}
    assert len({f.name for e in extras for f in dataclasses.fields(e)}) <= 2  # overwrite, n_eval
    for notebook in P.NOTEBOOKS:  # never a dataclass field under another role
        cls, extra = P.params_class(notebook)
        assert not {f.name for f in dataclasses.fields(cls)} & {f.name for f in dataclasses.fields(extra)}


def test_notebooks_are_templates_without_outputs():
    for notebook in P.NOTEBOOKS:
        nb = nbformat.read(ROOT / notebook, as_version=4)
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), \
            f"{notebook} carries outputs: executed instances live in tests/notebooks/ and book/runs/"


def test_nbval_instances_are_the_smoke_profile_of_the_current_notebooks():
    runs = study.nbval_runs(study.load_profile("smoke"))
    assert {r.notebook for r in runs} == set(P.NOTEBOOKS), "every notebook needs a smoke run"
    assert {p.name for p in study.NBVAL.glob("*.ipynb")} == {study.nbval_path(r).name for r in runs}
    for run in runs:
        want = study.nbval_instance(run)
        have = nbformat.read(study.nbval_path(run), as_version=4)
        hint = f"{study.nbval_path(run).name} is out of date: python -m repro.study --profile smoke --nbval"
        assert [(c.cell_type, c.source, c.metadata.get("tags", [])) for c in have.cells] == \
               [(c.cell_type, c.source, c.metadata.get("tags", [])) for c in want.cells], hint
        code = [c for c in have.cells if c.cell_type == "code" and "injected-parameters" not in c.metadata.tags]
        assert all(c.execution_count is not None for c in code), f"{hint} (not executed)"
        assert any(c.outputs for c in code if "nbval-ignore-output" not in c.metadata.get("tags", [])) \
            or all("nbval-ignore-output" in c.metadata.get("tags", []) for c in code[1:]), hint


@pytest.mark.parametrize("profile", ["default", "smoke"])
def test_every_profile_entry_is_valid(profile):
    assert study.invalid_runs(study.load_profile(profile)) == []


def test_smoke_settings_live_in_the_smoke_profile_only():
    seq = P.defaults(SequentialParams)
    assert seq["n_edits"] >= 100 and seq["hparams"] == {}
    smoke = {r.id: r.parameters for r in study.load_profile("smoke")}
    assert smoke["smoke_rome"]["n_edits"] < 10 and smoke["smoke_rome"]["hparams"]["stats_tokens"] <= 4000


def _built(run: study.Run):
    cls, extra = P.params_class(run.notebook)
    params, _ = P.build(cls, run.parameters, extra)
    return params.as_dict() if hasattr(params, "as_dict") else dataclasses.asdict(params)


def test_committed_runs_keep_their_parameters():
    """What the notebooks build from each done default run's declared parameters is what its file
    records (a parameter the file predates at the value study.IMPLICIT says it used; one added later
    without an entry there, e.g. MEND's n_loc_own, is not compared, as in Run.stale), so no
    committed file is stale and a rerun would find it as made with its parameters."""
    from repro.core.store import read_netcdf, run_params

    norm = lambda v: json.loads(json.dumps(v, sort_keys=True, default=str))  # noqa: E731
    checked = 0
    for run in study.load_profile("default"):
        if not run.output.exists():
            continue
        made, built = run_params(read_netcdf(run.output)), norm(_built(run))
        assert set(made) <= set(built), run.id
        for key, value in built.items():
            if key not in made and key not in study.IMPLICIT:
                continue
            assert value == norm(made.get(key, study.IMPLICIT.get(key))), (run.id, key, value, made.get(key))
        checked += 1
    assert checked >= 20


def test_committed_resume_states_still_resume():
    """Each committed resume state (an unfinished default run) was saved with the parameters the
    notebooks build today, so the run resumes rather than starting over. Skipped when every run of
    the profile has finished and no state is committed."""
    import torch

    from repro.runs.sequential import same_params
    from repro.core.store import state_path

    states = [run for run in study.load_profile("default") if state_path(run.output).exists()]
    if not states:
        pytest.skip("no resume state is committed: every run of the default profile has finished")
    for run in states:
        saved = torch.load(state_path(run.output), weights_only=False, map_location="cpu")["params"]
        assert same_params(saved, _built(run)), run.id


# ---- checking and coercing values ----------------------------------------------------------------
@pytest.mark.parametrize("value", ["abc", "2", 2.5, True, None, [2]])
def test_a_bad_integer_is_refused_naming_the_parameter(value):
    with pytest.raises(ValueError, match=r"n_edits must be an integer, got " + repr(value).replace("[", r"\[")):
        P.build(SequentialParams, {"n_edits": value})


@pytest.mark.parametrize("text,want", [("false", False), ("False", False), ("0", False), ("no", False),
                                       ("true", True), ("True", True), ("1", True), (False, False)])
def test_booleans_from_papermill_strings(text, want):
    _, nb = P.build(SequentialParams, {"overwrite": text}, P.Overwrite)
    assert nb.overwrite is want


@pytest.mark.parametrize("text", ["maybe", "", "off!", 1, None, []])
def test_anything_else_is_no_boolean(text):
    with pytest.raises(ValueError, match="overwrite must be true/false"):
        P.build(SequentialParams, {"overwrite": text}, P.Overwrite)


def test_unknown_names_are_listed_with_the_allowed_ones_and_all_problems_reported():
    with pytest.raises(ValueError) as err:
        P.build(SequentialParams, {"n_edit": 5, "batch_size": "x", "seed": 0.5})
    msg = str(err.value)
    assert "unknown parameter 'n_edit'" in msg and "allowed: model, editor, n_edits" in msg
    assert "batch_size must be an integer, got 'x'" in msg and "seed must be an integer, got 0.5" in msg


def test_types_of_the_other_annotations():
    from repro.runs.layer_sweep import LayerSweepParams
    from repro.runs.post_training import TrainParams

    p = P.build(TrainParams, {"lr": 1, "lora_targets": ["q", "v"], "device": None})
    assert p.lr == 1.0 and isinstance(p.lr, float) and p.lora_targets == ["q", "v"]
    for bad, match in [({"lr": "1e-4"}, "lr must be a number"), ({"device": 3}, "device must be a string or None"),
                       ({"lora_targets": "q"}, "lora_targets must be a list of strings or None"),
                       ({"intervention": None}, "intervention must be a string")]:
        with pytest.raises(ValueError, match=match):
            P.build(TrainParams, bad)
    with pytest.raises(ValueError, match="layers must be a list of integers"):
        P.build(LayerSweepParams, {"layers": [3, "6"]})
    with pytest.raises(ValueError, match="hparams must be a mapping"):
        P.build(SequentialParams, {"hparams": "{}"})


@pytest.mark.parametrize("values,match", [({"n_edits": 0}, "n_edits must be >= 1"),
                                          ({"batch_size": 0}, "batch_size must be >= 1"),
                                          ({"measure_at": [5], "n_edits": 3}, "measure_at"),
                                          ({"collapse": {"nope": 1}}, "nope")])
def test_ranges_come_from_the_dataclass_validate(values, match):
    with pytest.raises((ValueError, TypeError), match=match):
        P.build(SequentialParams, values)


def test_the_notebook_namespace_is_checked_misspelt_names_included():
    ns = {**P.defaults(SequentialParams), "overwrite": "false", "In": [], "_": 3, "np": ast}
    params, nb = P.from_notebook(SequentialParams, ns, P.Overwrite)
    assert params == SequentialParams() and nb.overwrite is False
    with pytest.raises(ValueError, match="unknown parameter 'n_edit'"):
        P.from_notebook(SequentialParams, {**ns, "n_edit": 5}, P.Overwrite)
    with pytest.raises(ValueError, match="n_edits must be an integer, got 'abc'"):
        P.from_notebook(SequentialParams, {**ns, "n_edits": "abc"}, P.Overwrite)


def test_the_study_checks_every_entry_before_running_any(tmp_path, monkeypatch, capsys):
    prof = tmp_path / "s.yaml"
    prof.write_text(
        "p:\n"
        "  - {id: good, notebook: notebooks/sequential_editing.ipynb, parameters: {n_edits: 3, output: a.nc}}\n"
        "  - {id: bad1, notebook: notebooks/sequential_editing.ipynb, parameters: {n_edits: '2', output: b.nc}}\n"
        "  - {id: bad2, notebook: notebooks/single_edit_efficacy.ipynb, parameters: {n_facts: 0, output: c.nc}}\n"
        "  - {id: bad3, notebook: notebooks/train_mend.ipynb, parameters: {steps: 3, n_facts: 2, output: d.nc}}\n")
    monkeypatch.setattr(study, "PROFILES", prof)
    monkeypatch.setattr(study, "EXECUTED", tmp_path)
    monkeypatch.setattr(study, "execute", lambda *a, **k: pytest.fail("executed a run before checking all"))
    assert study.main(["--profile", "p"]) == 2
    err = capsys.readouterr().err
    assert "3 run(s)" in err and "good" not in err
    assert "bad1: SequentialParams: n_edits must be an integer, got '2'" in err
    assert "bad2: n_facts and save_every must be >= 1" in err
    assert "bad3: MENDTrainParams: unknown parameter 'n_facts'" in err


def test_force_passes_overwrite_to_every_kind_of_run(monkeypatch, tmp_path):
    import papermill

    seen = {}
    monkeypatch.setattr(study, "EXECUTED", tmp_path)
    monkeypatch.setattr(papermill, "execute_notebook",
                        lambda src, dst, parameters, **kw: seen.update({src.split("/")[-1]: parameters}))
    for notebook in ("sequential_editing", "train_mend"):
        run = study.Run(notebook, f"notebooks/{notebook}.ipynb", {"output": "x.nc"})
        (tmp_path / f".{notebook}.ipynb.tmp.ipynb").write_text("{}")
        study.execute(run, force=True)
    assert seen == {"sequential_editing.ipynb": {"output": "x.nc", "overwrite": True},
                    "train_mend.ipynb": {"output": "x.nc", "overwrite": True}}
    assert all(P.accepts(notebook, "overwrite") for notebook in P.NOTEBOOKS)  # one lifecycle: all reuse


def test_the_python_api_checks_types_as_notebooks_do(tmp_path):
    from repro.runs.sequential import SequentialParams, run_sequential

    with pytest.raises(ValueError, match=r"n_edits must be an integer, got '2' \(str\)"):
        run_sequential(SequentialParams(n_edits="2", output=str(tmp_path / "x.nc")))
    with pytest.raises(ValueError, match="batch_size must be an integer, got 2.5"):
        run_sequential(SequentialParams(batch_size=2.5, output=str(tmp_path / "x.nc")))
