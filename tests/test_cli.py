import re
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml

import pipebd
from pipebd import Plan
from pipebd import config as config_module
from pipebd.cli import main
from pipebd.config import CodistillConfig, load_config


def test_defaults_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {pair: mlp, args: {num_blocks: 4}}\nsteps: 7\nplan: {stages: [[0, 1], [2, 3]]}\n")
    config = load_config(str(path), ["optimizer.lr=0.5", "world_size=2", "final_loss.temperature=3"])
    assert config.steps == 7 and config.optimizer.lr == 0.5 and config.world_size == 2
    assert config.final_loss.temperature == 3.0
    assert config.fit_plan().stages == ((0, 1), (2, 3)) and config.fit_plan().replicas == (1, 1)
    assert load_config(None, ["plan=auto"]).fit_plan() == "auto"
    assert load_config(None, ["plan=0|1-3x2"]).fit_plan() == Plan([[0], [1, 2, 3]], [1, 2])
    # Not valid YAML: taken as the plain string, so the plan syntax needs no extra quotes.
    assert load_config(None, ["plan=[0]x1 | [1-3]x2"]).fit_plan() == Plan([[0], [1, 2, 3]], [1, 2])
    assert load_config(None, ["sync_batchnorm=true"]).sync_batchnorm is True
    # A section that is null in the file (plan: null, final_loss absent) takes dotted keys.
    shipped = str(Path(__file__).parents[1] / "configs" / "default.yaml")
    config = load_config(shipped, ["plan.stages=[[0],[1],[2,3]]", "plan.replicas=[1,2,1]"])
    assert config.fit_plan() == Plan([[0], [1], [2, 3]], [1, 2, 1])
    assert load_config(None, ["final_loss.temperature=2"]).final_loss.temperature == 2.0


def test_the_readme_cli_lines_pass_check(capsys):
    # Every `pipebd run|profile|check|codistill` line of the README's CLI section, checked as it would run.
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = readme.split("## CLI", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    lines = [shlex.split(re.sub(r"\s#.*$", "", line)) for line in block.splitlines() if line.startswith("pipebd ")]
    checked = 0
    for words in lines:
        if words[1] not in ("run", "profile", "check", "codistill"):
            continue
        args = [w for w in words[2:] if w not in ("--resume", "--check")]
        args += ["--set", "resume=true"] if "--resume" in words else []
        args = [str(Path(__file__).parents[1] / a) if a.endswith(".yaml") else a for a in args]
        command = ["codistill", *args, "--check"] if words[1] == "codistill" else ["check", *args]
        assert main(command) == 0, (words, capsys.readouterr().err)
        checked += 1
    assert checked >= 13


def test_check_refuses_what_run_would_refuse(capsys):
    for override, message in (("steps=0", "steps must be an integer >= 1"),
                              ("batch_size=0", "batch_size must be an integer >= 1"),
                              ("world_size=0", "world_size must be an integer >= 1"),
                              ("max_inflight=0", "max_inflight must be an integer >= 1"),
                              ("num_workers=-1", "num_workers must be >= 0"),
                              ("optimizer.lr=-1", "optimizer.lr must be > 0 and finite"),
                              # A non-finite rate failed in training as a non-finite loss (exit 1);
                              # a rate of 0 trained nothing and exited 0.
                              ("optimizer.lr=.inf", "optimizer.lr must be > 0 and finite, got inf"),
                              ("optimizer.lr=0", "optimizer.lr must be > 0 and finite, got 0"),
                              ("optimizer.momentum=.inf", "optimizer.momentum must be >= 0 and finite"),
                              ("optimizer.weight_decay=.inf", "optimizer.weight_decay must be >= 0 and finite"),
                              ("final_loss.temperature=0", "final_loss.temperature must be > 0"),
                              ("device=tpu", "config key 'device' must be cpu, cuda or cuda:N, got 'tpu'"),
                              ("device=meta", "config key 'device' must be cpu, cuda or cuda:N, got 'meta'"),
                              ("device=gpu", "config key 'device' must be cpu, cuda or cuda:N, got 'gpu'"),
                              ("device=None", r"got 'None' \(null, the default, picks cuda when there is one\)"),
                              ("seed=99999999999999999999999", "config key 'seed' must fit in 64 bits"),
                              ("data.seed=-99999999999999999999999", "config key 'data.seed' must fit in 64 bits"),
                              ("data.samples=10000000000000", r"data.samples=10000000000000 synthetic inputs of "
                                                              r"shape \(3, 32, 32\) cannot be made: "),
                              ("plan=[0-3]", r"config key 'plan' must be a mapping or str, got \['0-3'\] \(quote"),
                              ("checkpoint_dir=/proc/pipebd-ck", "config key 'checkpoint_dir': cannot write in "
                                                                  "'/proc/pipebd-ck'"),
                              ("plan=[0-1]x1 | garbage", "cannot read stage 'garbage'"),
                              # A value that is not YAML is a string; where one does not fit, the
                              # YAML error says why (only the type was named).
                              ("model.args={", r"config key 'model.args' must be dict, got '\{' \(not valid "
                                               r"YAML: expected the node content, but found '<stream end>'\)"),
                              ("optimizer={name: sgd", r"must be a mapping, got '\{name: sgd' \(not valid YAML: "
                                                       r"expected ',' or '\}'"),
                              ("plan=[0]x1 | [1-3]x2", r"needs 3 ranks"),
                              ("checkpoint_every=5", "checkpoint_every needs checkpoint_dir"),
                              ("final_loss.alpha=0.5", "synthetic data has none")):
        assert main(["check", "--set", override]) == 2, override
        err = capsys.readouterr().err
        assert re.search(message, err), (override, err)


def test_the_yaml_error_of_an_override_is_named_only_while_its_value_stands():
    # A later override of the key, or of a section above it, replaces the value that was not YAML.
    for overrides in (["steps=[1", "steps=abc"], ["model.args={", "model={pair: mlp, args: 3}"]):
        with pytest.raises(ValueError) as info:
            load_config(None, overrides)
        assert "must be" in str(info.value) and "not valid YAML" not in str(info.value), overrides
    with pytest.raises(ValueError, match=r"got '\[1' \(not valid YAML: "):
        load_config(None, ["steps=2", "steps=[1"])


@pytest.mark.parametrize("text, message", [
    ("optimiser: {lr: 1}\n", "unknown config key 'optimiser' (did you mean 'optimizer'?)"),
    ("data: {sampels: 10}\n", "unknown config key 'data.sampels' (did you mean 'samples'?)"),
    ("steps: ten\n", "config key 'steps' must be int, got 'ten'"),
    ("optimizer: {lr: true}\n", "config key 'optimizer.lr' must be float, got True"),
    ("- 1\n", "the top level must be a mapping"),
    ("steps: [1\n", "bad.yaml is not valid YAML"),
    # PyYAML lets the last of two equal keys win silently.
    ("optimizer:\n  lr: 0.1\n  momentum: 0\n  lr: 0.2\n", "bad.yaml: duplicate key 'lr' on line 4 (first on line 2)"),
    ("steps: 1\noptimizer: {lr: 1}\nsteps: 2\n", "bad.yaml: duplicate key 'steps' on line 3 (first on line 1)"),
])
def test_config_errors_name_the_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as info:
        load_config(str(path))
    assert message in str(info.value)


def test_config_files_paths_and_kinds(tmp_path, monkeypatch, capsys, caplog):
    with pytest.raises(ValueError, match=f"config file '{tmp_path}' is a directory"):
        load_config(str(tmp_path))
    codistill = str(Path(__file__).parents[1] / "configs" / "codistill.yaml")
    assert main(["check", codistill]) == 2
    assert f"(a codistill config? pipebd codistill {codistill} --check)" in capsys.readouterr().err
    run = codistill.replace("codistill.yaml", "default.yaml")
    assert main(["codistill", run, "--check"]) == 2
    assert f"(a run config? pipebd check {run})" in capsys.readouterr().err
    monkeypatch.setenv("HOME", str(tmp_path))     # "~" is the home directory, not a folder named "~"
    config = load_config(None, ["trace=~/runs/t.json", "plot=~/p.png", "checkpoint_dir=~/ck"])
    assert (config.trace, config.plot, config.checkpoint_dir) == (f"{tmp_path}/runs/t.json", f"{tmp_path}/p.png",
                                                                  f"{tmp_path}/ck")
    # momentum is SGD's: with Adam a changed one is said to be unused
    with caplog.at_level("WARNING", logger="pipebd"):
        load_config(None, ["optimizer.name=adam", "optimizer.momentum=0.5"]).optimizer.build()
        load_config(None, ["optimizer.name=adam"]).optimizer.build()      # the default: nothing to say
    assert [r.getMessage() for r in caplog.records] == ["pipebd: optimizer.momentum=0.5 is not used by adam (sgd only)"]


def test_duplicate_keys_are_refused_in_overrides_too_but_merges_may_override(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"override 'optimizer=\{lr: 1, lr: 2\}': duplicate key 'lr'"):
        load_config(None, ["optimizer={lr: 1, lr: 2}"])
    assert main(["codistill", "--check", "--set", "data={seed: 1, seed: 2}"]) == 2
    assert "pipebd: error: override 'data={seed: 1, seed: 2}': duplicate key 'seed'" in capsys.readouterr().err
    # A key brought in by a merge is meant to be overridden.
    path = tmp_path / "c.yaml"
    path.write_text("model: {pair: mlp, args: {<<: {num_blocks: 2, width: 8}, width: 16}}\n")
    assert load_config(str(path)).model.args == {"num_blocks": 2, "width": 16}
    # ...also where a mapping with a merge is itself merged, which rewrites it in place.
    text = "a: &A {lr: 1}\nx:\n  inner: &B\n    <<: *A\n    lr: 2\ny:\n  <<: *B\n"
    assert yaml.load(text, config_module._Loader) == yaml.safe_load(text)


def test_float_keys_take_scientific_notation(tmp_path, capsys):
    # YAML 1.1 (PyYAML) reads 1e-3, 5E-2 and 1.5e3 as strings; float keys take them as numbers.
    path = tmp_path / "c.yaml"
    path.write_text("model: {pair: mlp}\noptimizer: {lr: 5E-2, weight_decay: 1e-4}\nfinal_loss: {temperature: 1.5e1}\n")
    config = load_config(str(path), ["timeout=1e3", "optimizer.momentum=-2.5e-4"])
    assert (config.optimizer.lr, config.optimizer.weight_decay, config.optimizer.momentum) == (0.05, 1e-4, -2.5e-4)
    assert config.final_loss.temperature == 15.0 and config.timeout == 1000.0
    assert load_config(None, ["optimizer.weight_decay=1e-4"], CodistillConfig).optimizer.weight_decay == 1e-4
    assert main(["check", str(path), "--set", "optimizer.lr=1e-3"]) == 0
    assert "  lr: 0.001\n" in capsys.readouterr().out
    # Only decimal numbers: other strings, and nan and inf spelt so (YAML's are .nan and .inf), stay refused.
    for value in ("abc", "1e", "e3", "nan", "inf", "1e-3x", "1e999"):
        with pytest.raises(ValueError, match=f"config key 'optimizer.lr' must be float, got '{value}'"):
            load_config(None, [f"optimizer.lr={value}"])
    assert load_config(None, ["optimizer.lr=.inf"]).optimizer.lr == float("inf")
    # Integer keys are unchanged: 1e3 is not an int.
    with pytest.raises(ValueError, match="config key 'steps' must be int, got '1e3'"):
        load_config(None, ["steps=1e3"])


def test_cli_runs_a_config_and_writes_a_trace_and_a_plot(tmp_path, capsys):
    trace, plot = tmp_path / "t.json", tmp_path / "p.png"
    code = main(["run", "--set", "model={pair: mlp}", "--set", "steps=5", "--set", "batch_size=8",
                 "--set", "data.samples=64", "--set", "world_size=2", "--set", f"trace={trace}",
                 "--set", f"plot={plot}"])
    out = capsys.readouterr().out
    assert code == 0
    assert "throughput" in out and "teacher block runs: [40, 40, 40, 40]" in out
    assert trace.exists() and plot.read_bytes()[:4] == b"\x89PNG"


TINY = ["--set", "model={pair: mlp}", "--set", "steps=2", "--set", "batch_size=8", "--set", "data.samples=16",
        "--set", "world_size=1", "--set", "device=cpu"]


def test_cli_makes_output_folders_and_refuses_unwritable_outputs_before_training(tmp_path, monkeypatch, capsys):
    # The trace and plot are written after training: a path that cannot be written must be
    # refused before it (check too), and missing folders made, not found missing after the run.
    trace, plot = tmp_path / "new" / "sub" / "t.json", tmp_path / "other" / "p.png"
    assert main(["check", *TINY, "--set", f"trace={trace}", "--set", f"plot={plot}"]) == 0
    assert not trace.parent.parent.exists()        # check creates nothing
    assert main(["run", *TINY, "--set", f"trace={trace}", "--set", f"plot={plot}"]) == 0
    assert trace.stat().st_size > 0 and plot.read_bytes()[:4] == b"\x89PNG"

    fits = []
    monkeypatch.setattr(pipebd.Distiller, "fit", lambda self, *a, **k: fits.append(k))
    monkeypatch.setattr(pipebd.Codistillation, "fit", lambda self, *a, **k: fits.append(k))
    blocker = tmp_path / "file"
    blocker.write_text("")
    under_a_file = blocker / "sub" / "t.json"
    (tmp_path / "dangling.json").symlink_to(blocker / "x.json")
    for override, message in ((f"trace={under_a_file}", f"config key 'trace': cannot write '{under_a_file}': "
                                                         f"{blocker} is not a directory"),
                              # Failed after training: written where the link points, under a file.
                              (f"trace={tmp_path / 'dangling.json'}", f"config key 'trace': cannot write "
                                                                      f"'{tmp_path / 'dangling.json'}': {blocker} is not"),
                              (f"trace={tmp_path / 'new'}/", f"config key 'trace': cannot write '{tmp_path / 'new'}/': "
                                                             f"it is a directory"),
                              (f"plot={tmp_path}", f"config key 'plot': cannot write '{tmp_path}': it is a directory"),
                              (f"plot={tmp_path / 'p.txt'}", f"config key 'plot': cannot plot to '{tmp_path / 'p.txt'}': "
                                                             f"matplotlib writes no .txt files"),
                              # Permission bits pass root; trying to write does not.
                              ("trace=/proc/pipebd/t.json", "config key 'trace': cannot write '/proc/pipebd/t.json': "
                                                            "No such file or directory (/proc)")):
        for command in (["check", *TINY[:2]], ["run", *TINY[:2]], ["codistill", "--check"], ["codistill"]):
            assert main([*command, "--set", "steps=1", "--set", override]) == 2, (command, override)
            assert f"pipebd: error: {message}" in capsys.readouterr().err, (command, override)
    for command in (["check", *TINY[:2]], ["run", *TINY[:2]], ["codistill"]):    # the plot overwrote the trace
        assert main([*command, "--set", f"trace={trace}", "--set", f"plot={trace.parent}/./t.json"]) == 2
        assert "config keys 'trace' and 'plot' name the same file" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib", None)    # as if not installed
    assert main(["run", *TINY, "--set", f"plot={plot}"]) == 2
    assert "pipebd: error: config key 'plot': plotting needs matplotlib" in capsys.readouterr().err
    assert fits == []


def test_cli_profile_prints_costs_plan_and_predictions(tmp_path, capsys):
    code = main(["profile", "--set", "model={pair: emulated, args: {profile: unbalanced, scale: 0.2}}",
                 "--set", "batch_size=16", "--set", "steps=10", "--set", "world_size=3", "--set", "data.samples=32",
                 "--set", "plan=[0-4]x2 | [5]x1", "--set", f"trace={tmp_path / 't.json'}"])
    out = capsys.readouterr().out
    assert code == 0
    assert "teacher ms" in out and "allreduce: 2 ranks" in out
    auto = next(line for line in out.splitlines() if line.startswith("auto: plan"))
    sims = [line for line in out.splitlines() if ": simulated " in line]
    # The auto plan, the config's plan, one range per rank (a poor plan: auto differs from both).
    assert [line.split(": simulated")[0] for line in sims] == ["auto plan", "the config's plan",
                                                                "one block range per rank", "baseline"]
    assert sims[1].startswith("the config's plan: simulated pipebd [0-4]x2 | [5]x1"), sims
    sims = [line.split(": ", 1)[1] for line in sims[:1] + sims[2:]]
    assert "writes no trace or plot" in out and not (tmp_path / "t.json").exists()
    # Over only 10 steps pipeline fill counts, so the auto plan (optimal in steady state) need
    # not beat one range per rank by much here; both beat the baseline by far on this profile.
    rate = [float(line.split(": ")[1].split()[0]) for line in sims]
    assert rate[0] >= 0.9 * rate[1] and min(rate[:2]) > 1.5 * rate[2], (auto, sims)


def test_cli_profile_checks_steps_before_measuring(monkeypatch, capsys):
    monkeypatch.setattr(pipebd.Distiller, "profile", lambda *a, **k: pytest.fail("measured"))
    for override, message in (("steps=0", "steps must be an integer >= 1"),
                              ("max_inflight=0", "max_inflight must be an integer >= 1"),
                              # It checks the whole config it profiles, as run would.
                              ("strategy=foo", "strategy must be one of"),
                              ("plan=foo", "cannot read stage 'foo'"),
                              ("checkpoint_every=-5", "checkpoint_every must be an integer >= 1"),
                              ("trace=/proc/pipebd/t.json", "config key 'trace': cannot write")):
        assert main(["profile", "--set", "model={pair: mlp}", "--set", override]) == 2
        assert message in capsys.readouterr().err


def test_cli_profile_simulates_one_range_per_rank_only_when_it_is_not_the_auto_plan(capsys):
    assert main(["profile", *TINY]) == 0
    sims = [line for line in capsys.readouterr().out.splitlines() if ": simulated " in line]
    assert [line.split(" [")[0] for line in sims] == ["auto plan: simulated pipebd", "baseline: simulated baseline"]


def test_cli_profile_says_which_plans_fit_would_refuse(capsys):
    # A batch of 2 on 3 ranks: the baseline gives a rank no row. It was left out without a word.
    assert main(["profile", *TINY, "--set", "world_size=3", "--set", "batch_size=2"]) == 0
    out = capsys.readouterr().out
    assert "baseline: not simulated, as fit would refuse it: batch_size 2 is smaller than the widest" in out
    assert "auto: plan " in out and "steady state" in out


def test_auto_plans_need_not_give_every_rank_a_row(capsys):
    # 6 ranks for 4 blocks: one block range per rank has a stage of 2 replicas, which a batch of
    # 1 cannot feed; the planner plans for the batch, so "auto" (fit, profile, check) takes it.
    assert main(["check", "--set", "world_size=6", "--set", "batch_size=1"]) == 2
    assert "batch_size 1 is smaller than the widest stage's replica count (2)" in capsys.readouterr().err
    assert main(["check", "--set", "world_size=6", "--set", "batch_size=1", "--set", "plan=auto"]) == 0


def test_cli_reports_errors_without_a_traceback(capsys):
    for command in ("check", "run"):   # check refuses what fit would
        assert main([command, "--set", "model={pair: mlp}", "--set", "strategy=dna"]) == 2
        assert "pipebd: error: strategy must be one of" in capsys.readouterr().err
    assert main(["check", "--set", "model.pair=vit"]) == 2
    assert main(["check", "--set", "timeout=0"]) == 2
    assert "pipebd: error: timeout must be between 0.001 and 2147483 seconds (about 24 days), got 0.0" in capsys.readouterr().err


def test_cli_passes_the_timeout_to_fit(monkeypatch):
    seen = []
    monkeypatch.setattr(pipebd.Distiller, "fit", lambda self, *a, **k: seen.append(k["timeout"]) or 1 / 0)
    monkeypatch.setattr(pipebd.Distiller, "profile", lambda self, *a, **k: seen.append(k["timeout"]) or 1 / 0)
    monkeypatch.setattr(pipebd.Codistillation, "fit", lambda self, *a, **k: seen.append(k["timeout"]) or 1 / 0)
    for command in ("run", "profile", "codistill"):
        with pytest.raises(ZeroDivisionError):
            main([command, "--set", "timeout=45", "--set", "steps=1"])
    assert seen == [45.0, 45.0, 45.0] and load_config(None).timeout == 600.0


def raising(error):
    """A stand-in for ``fit`` that raises ``error``."""
    def fit(self, *args, **kwargs):
        raise error
    return fit


def test_cli_failed_runs_print_the_error_and_interrupts_one_line(monkeypatch, capsys):
    # A student whose loss overflows, in this process (world_size 1): the NonFiniteLoss is the
    # run's outcome, not a bug in the CLI, so no traceback of the parent; rc 1 (2 is a bad config).
    assert main(["run", *TINY, "--set", "optimizer.lr=1.0e+30", "--set", "steps=3"]) == 1
    err = capsys.readouterr().err
    assert re.fullmatch(r"pipebd: error: non-finite loss \((inf|nan)\) at stage 0, block \d, step \d\n", err), err
    # A rank's failure: its message already holds the rank's traceback, printed once as it is.
    failure = pipebd.WorkerError(1, "rank 1 (stage 1, replica 0) failed:\nTraceback (most recent call last):\n"
                                    "  ...\nValueError: boom")
    monkeypatch.setattr(pipebd.Codistillation, "fit", raising(failure))
    assert main(["codistill", "--set", "steps=1"]) == 1
    assert capsys.readouterr().err == f"pipebd: error: {failure}\n"
    # A rank's non-finite loss is the same outcome: one line, with the rank, not its traceback.
    from pipebd.runtime.launch import _worker_error
    diverged = _worker_error([(0.0, "Traceback (most recent call last):\n  ...\npipebd.runtime.worker."
                                    "NonFiniteLoss: non-finite loss (inf) at stage 1, block 2, step 3\n", (3, 2), 1)],
                             lambda rank: " (stage 1, replica 0)", [])
    monkeypatch.setattr(pipebd.Distiller, "fit", raising(diverged))
    assert main(["run", *TINY]) == 1
    assert capsys.readouterr().err == ("pipebd: error: rank 1 (stage 1, replica 0): non-finite loss (inf) at "
                                       "stage 1, block 2, step 3\n")
    assert isinstance(diverged, pipebd.NonFiniteLoss) and diverged.where == (3, 2)
    monkeypatch.setattr(pipebd.Distiller, "fit", raising(KeyboardInterrupt))
    assert main(["run", *TINY]) == 130
    assert capsys.readouterr().err == "pipebd: interrupted\n"
    # Anything else is a bug and keeps its traceback.
    monkeypatch.setattr(pipebd.Distiller, "fit", raising(RuntimeError("bug")))
    with pytest.raises(RuntimeError, match="bug"):
        main(["run", *TINY])


def test_help_and_version_import_no_torch():
    # The CLI parses its arguments before it loads torch (seconds): --help and --version answer at once.
    code = ("import sys\nfrom pipebd.cli import main\nfor args in (['--version'], ['run', '--help']):\n"
            "    try:\n        main(args)\n    except SystemExit:\n        pass\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("pipebd 0.1.0\nusage: pipebd run") and out.stdout.endswith("[]\n")
    assert "trace=PATH" in out.stdout and "plot=PATH" in out.stdout   # outputs the run help names
    # So the package loads its names on first use; each of __all__ resolves, and so does each
    # submodule as an attribute (pipebd.api was one once the package was imported; a test that
    # patched "pipebd.api.spawn" failed when run alone).
    code = "import pipebd\nprint(pipebd.runtime.launch.spawn.__name__, pipebd.api.Distiller is pipebd.Distiller)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout == "spawn True\n", out.stderr
    with pytest.raises(AttributeError, match="module 'pipebd' has no attribute 'nothing'"):
        pipebd.nothing
    assert set(pipebd.__all__) == set(pipebd._WHERE) | {"lr", "__version__"}
    assert all(getattr(pipebd, name).__name__ in (name, "pipebd.lr") for name in pipebd.__all__ if name != "__version__")
    # dir() lists the public names and loaded submodules, not the package file's own imports.
    assert set(pipebd.__all__) <= set(dir(pipebd)) and "api" in dir(pipebd)
    assert not {"Any", "TYPE_CHECKING", "annotations", "importlib", "types", "_WHERE"} & set(dir(pipebd))


def test_processes_of_the_fork_server_stay_interruptible():
    # The ranks' fork server ignores SIGINT only while it loads torch: a process it forks later,
    # for the caller's own multiprocessing too, gets Python's handler (it inherited SIG_IGN from
    # a first fix, and slept through a Ctrl-C).
    import multiprocessing as mp
    import os
    import signal
    import time

    teacher, student = pipebd.models.mlp_pair(num_blocks=2)
    pipebd.Distiller(teacher, student, device="cpu").fit(torch.randn(8, 16), 4, 1, world_size=2, timeout=60)
    sleeper = mp.get_context("forkserver").Process(target=time.sleep, args=(60,))
    sleeper.start()
    try:
        time.sleep(1.0)     # to be in time.sleep, not starting
        os.kill(sleeper.pid, signal.SIGINT)
        sleeper.join(20)
        assert sleeper.exitcode == 1        # KeyboardInterrupt
    finally:
        sleeper.kill()


@pytest.mark.parametrize("when", ["importing at 0.25", "importing at 0.3", "importing at 0.5", "starting ranks",
                                  "training"])
def test_a_ctrl_c_at_any_moment_is_one_line_and_leaves_nothing_running(tmp_path, when):
    # One SIGINT to the process group, as a terminal's Ctrl-C sends it: while torch is imported, while
    # the ranks start (the fork server preloading, a rank's payload half-written) and while they train.
    # Before, the first two printed tracebacks (of the caller, the fork server or a rank).
    import os
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "pipebd", "run", "--set", "model={pair: mlp}", "--set",
                             "steps=100000", "--set", "world_size=2", "--set", "batch_size=8"],
                            cwd=tmp_path, start_new_session=True, stderr=subprocess.PIPE, text=True)
    try:
        if when.startswith("importing"):   # where torch imports numpy, which swallowed it (the run went on)
            time.sleep(float(when.split()[-1]))
        else:
            assert "pipebd: strategy" in proc.stderr.readline()   # fit starts the ranks after this line
            if when == "starting ranks":   # once the fork server runs, which takes seconds to preload torch
                deadline = time.monotonic() + 30
                while subprocess.run(["pgrep", "-g", str(proc.pid), "-f", "forkserver"]).returncode != 0:
                    assert time.monotonic() < deadline, "no fork server started"
                    time.sleep(0.05)
            else:
                time.sleep(4)   # the ranks train, or on a slow machine still start
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)     # a swallowed interrupt trains on: a timeout here
        # -SIGINT where a Ctrl-C escaped code that torch's import ran (Python then exits by the
        # signal, as a shell counts it: 130 too).
        assert proc.returncode in (130, -signal.SIGINT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert err == "pipebd: interrupted\n"
    deadline = time.monotonic() + 30        # a fork server still preloading exits once it has
    while subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, "processes of the run are still running"
        time.sleep(0.2)


def test_help():
    out = subprocess.run([sys.executable, "-m", "pipebd", "run", "--help"], capture_output=True, text=True,
                         timeout=60).stdout
    assert "--set KEY=VALUE" in out
    version = subprocess.run([sys.executable, "-m", "pipebd", "--version"], capture_output=True, text=True,
                             timeout=60).stdout
    assert version == f"pipebd {pipebd.__version__}\n"


def test_a_plan_that_leaves_ranks_idle_is_warned_about_before_the_run(caplog):
    with caplog.at_level("WARNING", logger="pipebd"):
        assert main(["check", *TINY, "--set", "world_size=4", "--set", "plan=[0-1]x1 | [2-3]x1"]) == 0
    assert "the plan [0-1]x1 | [2-3]x1 uses 2 of 4 ranks: rank(s) 2-3 will be idle" in caplog.text


CODISTILL = ["--set", "data={samples: 600, features: 8, classes: 4, test_fraction: 0.2, seed: 3}",
             "--set", "model.hidden=16", "--set", "optimizer={lr: 0.1, momentum: 0.9}", "--set", "warmup_steps=5",
             "--set", "cosine=true", "--set", "alpha=0.5", "--set", "temperature=3", "--set", "burn_in=5",
             "--set", "exchange_every=5", "--set", "batch_size=16", "--set", "eval_every=10",
             "--set", "backend=torch", "--set", "device=cpu"]


def table(out):
    """The per-model rows of a codistillation report: (loss last, accuracy), and the ensemble line."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == ["model"]) + 1
    rows = [line.split() for line in lines[start:] if line.split()[:1] and line.split()[0].isdigit()]
    return [(float(r[2]), r[3]) for r in rows], next(line for line in lines if line.startswith("ensemble"))


def test_cli_codistill_is_the_api_call_it_describes(tmp_path, capsys, caplog):
    # The reference is the API call written out by hand; the CLI must build the same data, models,
    # optimizer and schedule. Then the CLI resumes a 2-rank run, saved after 20 steps, to step 30
    # and must print what the uninterrupted 1-process run prints.
    import functools

    import torch
    from torch import nn

    import pipebd
    from pipebd import datasets

    x, y = datasets.synthetic(600, features=8, classes=4, seed=3)
    train, test = datasets.split(x, y, test_rows=120)

    def schedule(opt):
        return pipebd.lr.warmup(opt, 5, then=torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=30))

    cd = pipebd.Codistillation(lambda i: nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), n=2,
                               optimizer=functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9),
                               scheduler=schedule, alpha=0.5, temperature=3.0, burn_in=5, exchange_every=5,
                               backend="torch", device="cpu")
    reference = cd.fit(train, batch_size=16, steps=30, seed=0, eval_data=test, eval_every=10, progress=False)
    expected_rows, expected_ensemble = table(str(reference))
    assert len(expected_rows) == 2

    assert main(["codistill", *CODISTILL, "--set", "steps=30", "--set", "world_size=1"]) == 0
    out = capsys.readouterr().out
    assert "480 training rows, accuracy on 120 held-out rows" in out
    assert table(out) == (expected_rows, expected_ensemble)

    # Without the cosine (whose length is the first run's steps), 20 steps on 2 ranks and a resume
    # to 30 print what 30 steps in one process print.
    warmup_only = [*CODISTILL, "--set", "cosine=false"]
    assert main(["codistill", *warmup_only, "--set", "steps=30", "--set", "world_size=1"]) == 0
    uninterrupted = table(capsys.readouterr().out)
    assert uninterrupted != (expected_rows, expected_ensemble)      # the cosine changed something
    ckpt, trace = tmp_path / "ckpt", tmp_path / "trace.json"
    resumable = [*warmup_only, "--set", "world_size=2", "--set", f"checkpoint_dir={ckpt}"]
    assert main(["codistill", *resumable, "--set", "steps=20", "--set", f"trace={trace}",
                 "--set", f"plot={tmp_path / 'c.png'}"]) == 0
    assert trace.stat().st_size > 0 and "trace written to" in capsys.readouterr().out
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["codistill", *resumable, "--set", "steps=30", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "resumed after step 20" in out
    (rows, ensemble), (expected_rows, expected_ensemble) = table(out), uninterrupted
    assert ensemble == expected_ensemble
    for (loss, accuracy), (expected_loss, expected_accuracy) in zip(rows, expected_rows):
        assert accuracy == expected_accuracy and loss == pytest.approx(expected_loss, rel=2e-3)   # 4 digits printed
    # With the cosine, a resume for more steps than it spans would raise the rate again: refused.
    cosine = [*CODISTILL, "--set", "world_size=1", "--set", f"checkpoint_dir={tmp_path / 'cosine'}"]
    assert main(["codistill", *cosine, "--set", "steps=8"]) == 0
    capsys.readouterr()
    assert main(["codistill", *cosine, "--set", "steps=12", "--resume"]) == 2
    assert ("cosine: true decays the learning rate over the first run's steps=8, and a resume keeps that "
            "schedule" in capsys.readouterr().err)
    # --check refuses what the run would, from the saved run too (it checked the options only).
    assert main(["codistill", *cosine, "--set", "steps=12", "--resume", "--check"]) == 2
    assert "cosine: true decays the learning rate over the first run's steps=8" in capsys.readouterr().err
    assert main(["codistill", *cosine, "--set", "steps=8", "--check"]) == 2
    assert "already holds a pipebd run (run.json); pass resume=True" in capsys.readouterr().err
    assert main(["codistill", *resumable, "--set", "steps=40", "--set", "n=3", "--set", "world_size=3", "--resume",
                 "--check"]) == 2
    assert "is of a run with n=2, this run has n=3" in capsys.readouterr().err
    # The distillation settings are recorded; a resume that changes them is told (as --check shows).
    import json
    assert json.loads((ckpt / "run.json").read_text())["distillation"] == {"alpha": 0.5, "temperature": 3.0,
                                                                          "burn_in": 5}
    caplog.clear()
    assert main(["codistill", *resumable, "--set", "steps=40", "--resume", "--check"]) == 0
    assert "distillation settings differ" not in caplog.text
    assert main(["codistill", *resumable, "--set", "steps=40", "--set", "alpha=0.7", "--set", "burn_in=6",
                 "--resume", "--check"]) == 0
    assert ("distillation settings differ from the checkpoint's (alpha saved 0.5, this run 0.7; burn_in saved 5, "
            "this run 6): the steps after step 30 use this run's" in caplog.text)


def test_check_refuses_triton_on_a_cpu_without_the_interpreter(monkeypatch, capsys):
    # The kernels would raise a RuntimeError deep in the shape probe (run) or in a worker after
    # the burn-in (codistill); the CLI says it up front.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert main(["check", "--set", "final_loss.backend=triton", "--set", "device=cpu"]) == 2
    assert "final_loss.backend=triton runs on CUDA (device is cpu)" in capsys.readouterr().err
    monkeypatch.setattr(pipebd.Codistillation, "fit", lambda self, *a, **k: pytest.fail("trained"))
    for command in (["codistill", "--check"], ["codistill"]):
        assert main([*command, "--set", "backend=triton", "--set", "device=cpu", "--set", "steps=1"]) == 2
        assert "pipebd: error: backend=triton runs on CUDA (device is cpu)" in capsys.readouterr().err
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert main(["check", "--set", "final_loss.backend=triton", "--set", "device=cpu",
                 "--set", "model={pair: mlp}"]) == 0
    assert main(["codistill", "--check", "--set", "backend=triton", "--set", "device=cpu"]) == 0


@pytest.mark.parametrize("args, message", [
    ("width=-4", "model.args {'width': -4} do not build model.pair 'cnn': width must be an integer >= 2, got -4"),
    ("width=1.5", "model.args {'width': 1.5} do not build model.pair 'cnn': width must be an integer >= 2, got 1.5"),
    ("width=0", "model.args {'width': 0} do not build model.pair 'cnn': width must be an integer >= 2, got 0"),
    # It built mismatched blocks before, refused at the shape probe without naming the key.
    ("depth=0", "model.args {'depth': 0} do not build model.pair 'cnn': depth must be an integer >= 1, got 0"),
    ("depht=3", "model.args {'depht': 3} do not build model.pair 'cnn': cnn_pair() got an unexpected keyword "
                "argument 'depht' (model.args are the arguments of model.pair 'cnn'; for its defaults: "
                "--set 'model.args={}')"),
    ("seed=1", "model.args.seed: the models are initialized from the top-level seed"),
])
def test_model_args_that_do_not_build_are_config_errors_naming_them(capsys, args, message):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["check", "--set", f"model.args.{args}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"pipebd: error: {message}") and err.count("\n") == 1, err
    assert [str(w.message) for w in caught] == []     # width=0's zero-element warnings: noise before the error


def test_cli_codistill_checks_and_refuses_bad_configs(capsys):
    shipped = str(Path(__file__).parents[1] / "configs" / "codistill.yaml")
    assert main(["codistill", shipped, "--check", "--set", "mode=online", "--set", "n=3", "--set", "world_size=3"]) == 0
    out = capsys.readouterr().out
    assert "mode: online" in out and "n: 3" in out and "exchange_every: 25" in out and "burn_in: 50" in out
    assert main(["codistill", "--check"]) == 0 and "exchange_every: 50" in capsys.readouterr().out   # built-in
    for override, message in (("data.kind=imagenet", "data.kind must be one of synthetic, digits"),
                              ("mode=ensemble", "mode must be one of"),
                              ("data.test_fraction=1.5", "data.test_fraction must be between 0 and 1"),
                              ("plan=auto", "unknown config key 'plan'"),
                              ("world_size=3", "world_size 3 must be 1 or a multiple of n=2"),
                              ("timeout=-1", "timeout must be between 0.001 and 2147483 seconds"),
                              ("data.samples=1", "data.samples=1 leaves no training rows once "
                                                 "data.test_fraction=0.2 (1 rows) is held out")):
        assert main(["codistill", "--set", override, "--set", "steps=1"]) == 2, override
        assert message in capsys.readouterr().err, override
    for override, message in (("steps=0", "steps must be an integer >= 1"),
                              ("eval_every=0", "eval_every must be an integer >= 1"),
                              ("num_workers=-1", "num_workers must be >= 0")):
        assert main(["codistill", "--check", "--set", override]) == 2, override
        assert message in capsys.readouterr().err, override


def test_a_failed_output_does_not_cost_the_other_and_a_pgf_plot_needs_tex(tmp_path, monkeypatch, capsys):
    import shutil
    pytest.importorskip("matplotlib")
    trace, plot = tmp_path / "t.json", tmp_path / "p.png"

    def full(self, path):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(pipebd.Report, "save_trace", full)
    assert main(["run", *TINY, "--set", f"trace={trace}", "--set", f"plot={plot}"]) == 2
    assert "config key 'trace': cannot write" in capsys.readouterr().err and not trace.exists()
    assert plot.read_bytes()[:4] == b"\x89PNG"
    # matplotlib measures text with a TeX system to write .pgf: without one, refused before training.
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert main(["check", *TINY, "--set", f"plot={tmp_path / 'p.pgf'}"]) == 2
    assert "config key 'plot': cannot plot to" in capsys.readouterr().err


def test_the_device_is_named_before_the_loss_backend_reads_it(capsys):
    assert main(["check", *TINY, "--set", "final_loss={temperature: 2.0}", "--set", "device=gpu"]) == 2
    assert capsys.readouterr().err == "pipebd: error: config key 'device' must be cpu, cuda or cuda:N, got 'gpu'\n"


def test_check_refuses_the_saved_runs_that_run_would(tmp_path, capsys):
    ck = ["--set", f"checkpoint_dir={tmp_path / 'ck'}"]
    assert main(["run", *TINY, *ck]) == 0
    capsys.readouterr()
    assert main(["check", *TINY, *ck]) == 2
    assert "already holds a pipebd run (run.json); pass resume=True (--resume" in capsys.readouterr().err
    assert main(["check", *TINY, *ck, "--resume"]) == 2
    assert "every block of the checkpoint in" in capsys.readouterr().err
    assert main(["check", *TINY, *ck, "--resume", "--set", "steps=4"]) == 0
    assert main(["check", *TINY, *ck, "--resume", "--set", "batch_size=4"]) == 2   # another run's key
