"""predict, k-fold/multi-seed fine-tuning and tuning on Dask (issue 17), on a LocalCluster this module starts:
two worker processes, one thread each. Outputs are compared with the single-process runs; one test kills a
worker in the middle of a predict run. Skips with a reason where dask[distributed] is not installed."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from PIL import Image

from lightcnn.checkpoint import read_checkpoint
from lightcnn.predict import main as predict_main
from tests.conftest import save_tiny_mobilenet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING = ("decode_ms", "preprocess_ms", "inference_ms")


@pytest.fixture(scope="module")
def cluster():
    """(client, address) of a LocalCluster with 2 worker processes x 1 thread, the worktree on their path."""
    distributed = pytest.importorskip("distributed", reason="dask[distributed] is not installed "
                                                            "(pip install 'lightcnn[dask]')")
    env = {"PYTHONPATH": os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p),
           "LIGHTCNN_ENGINE": "numpy", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  silence_logs=50, env=env) as lc, distributed.Client(lc) as client:
        yield client, lc.scheduler_address


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """imgs/: 40 small PNGs + one unreadable file; data/<class>/: 2 x 12 images to fine-tune on; tiny.h5."""
    root = tmp_path_factory.mktemp("dask")
    rng = np.random.default_rng(0)
    (root / "imgs").mkdir()
    for i in range(40):
        Image.fromarray(rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)).save(root / "imgs" / f"{i:03d}.png")
    (root / "imgs" / "017_broken.png").write_bytes(b"not an image at all")
    for cls, level in (("bright", 170), ("dark", 70)):
        (root / "data" / cls).mkdir(parents=True)
        for i in range(12):
            pixels = np.clip(rng.normal(level, 40, (36, 36, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / "data" / cls / f"{i:02d}.png")
    save_tiny_mobilenet(root / "tiny.h5")
    return root


def _predict(capsys, workspace, *extra):
    code = predict_main(["--weights", str(workspace / "tiny.h5"), str(workspace / "imgs"), "--engine", "numpy",
                         "--topk", "3", "-q", *extra])
    out, err = capsys.readouterr()
    return code, out, err


def _untimed(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def _parts(folder):
    return [json.loads(line) for p in sorted(folder.glob("part-*.jsonl")) for line in p.read_text().splitlines()]


def test_predict_on_dask_prints_what_one_process_prints(cluster, workspace, capsys):
    _, address = cluster
    code, single, single_err = _predict(capsys, workspace)
    code_d, dask_out, dask_err = _predict(capsys, workspace, "--dask", address, "--chunk-size", "16")
    assert (code, code_d) == (1, 1)  # the broken file fails in both, once
    assert dask_out == single and single.count("\n\n") == 39
    assert dask_err.splitlines() == single_err.splitlines() == [
        f"error: {workspace / 'imgs' / '017_broken.png'}: not a recognised image format (19 bytes)"]
    # JSON lines too, timings aside (chunks of 16 = predict's own batches, so the arithmetic is the same)
    _, single_json, _ = _predict(capsys, workspace, "--json")
    _, dask_json, _ = _predict(capsys, workspace, "--json", "--dask", address, "--chunk-size", "16")
    assert _untimed(map(json.loads, dask_json.splitlines())) == _untimed(map(json.loads, single_json.splitlines()))


def test_predict_out_writes_parts_and_resume_runs_only_missing_chunks(cluster, workspace, capsys, tmp_path):
    _, address = cluster
    _, single_json, _ = _predict(capsys, workspace, "--json")
    manifest = tmp_path / "list.txt"  # the same images through --manifest, one path a line
    manifest.write_text("\n".join(str(p) for p in sorted((workspace / "imgs").iterdir())) + "\n")
    args = ["--manifest", str(manifest), "--out", str(tmp_path / "parts"), "--chunk-size", "16"]
    code = predict_main(["--weights", str(workspace / "tiny.h5"), "--engine", "numpy", "--topk", "3", "-q",
                         "--dask", address, *args])
    out, err = capsys.readouterr()
    assert code == 1 and out == "" and err.count("error:") == 1
    names = sorted(p.name for p in (tmp_path / "parts").glob("part-*.jsonl"))
    assert names == [f"part-{i:05d}.jsonl" for i in range(3)]  # 41 files in chunks of 16
    records = _parts(tmp_path / "parts")
    expected = [json.loads(line) for line in single_json.splitlines()]
    assert _untimed(r for r in records if "error" not in r) == _untimed(expected)
    assert [r["error"] for r in records if "error" in r] == [err.split("error: ", 1)[1].strip()]

    kept = tmp_path / "parts" / "part-00000.jsonl"
    before = kept.stat().st_mtime_ns
    (tmp_path / "parts" / "part-00001.jsonl").unlink()
    assert predict_main(["--weights", str(workspace / "tiny.h5"), "--engine", "numpy", "--topk", "3",
                         "--dask", address, *args]) == 1
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and "holds an earlier run" in err  # without --resume the folder is refused
    assert predict_main(["--weights", str(workspace / "tiny.h5"), "--engine", "numpy", "--topk", "3",
                         "--dask", address, "--resume", *args]) == 1
    out, err = capsys.readouterr()
    assert "resume: 2 of 3 chunks" in err and err.count("error:") == 1  # the broken image is reported again
    assert kept.stat().st_mtime_ns == before
    assert _untimed(_parts(tmp_path / "parts")) == _untimed(records)
    # --out without --dask: the same chunk tasks one after another in this process, the same part files
    args[args.index(str(tmp_path / "parts"))] = str(tmp_path / "inline")
    assert predict_main(["--weights", str(workspace / "tiny.h5"), "--engine", "numpy", "--topk", "3", "-q",
                         *args]) == 1
    capsys.readouterr()
    assert _untimed(_parts(tmp_path / "inline")) == _untimed(records)


def test_killed_worker_loses_no_image_and_duplicates_none(cluster, workspace, capsys, tmp_path):
    client, address = cluster
    images = tmp_path / "big"
    images.mkdir()
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (700, 700, 3), dtype=np.uint8)).save(images / "000.png")
    for i in range(1, 48):  # slow enough to decode that the run is still going when a worker dies
        shutil.copy(images / "000.png", images / f"{i:03d}.png")
    out_dir = tmp_path / "parts"
    result = {}

    def run():
        result["code"] = predict_main(["--weights", str(workspace / "tiny.h5"), str(images), "--engine", "numpy",
                                       "-q", "--dask", address, "--chunk-size", "2", "--out", str(out_dir)])

    pids = sorted(client.run(os.getpid).values())
    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 30
    while not list(out_dir.glob("part-*.jsonl")) and time.monotonic() < deadline:
        time.sleep(0.005)
    parts_at_kill = len(list(out_dir.glob("part-*.jsonl")))
    os.kill(pids[0], signal.SIGKILL)
    thread.join(120)
    capsys.readouterr()
    assert result["code"] == 0 and 1 <= parts_at_kill < 24  # killed mid-run
    files = [r["file"] for r in _parts(out_dir)]
    assert files == [str(images / f"{i:03d}.png") for i in range(48)]  # each image once, in order
    client.wait_for_workers(2, timeout=60)  # the nanny restarted the killed worker for the next tests


def test_missing_dask_extra_is_one_line(workspace):
    code = ("import sys; sys.modules['dask'] = None; from lightcnn.predict import main; "
            f"sys.exit(main(['--weights', {str(workspace / 'tiny.h5')!r}, {str(workspace / 'imgs')!r}, "
            "'--dask', 'local:2']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=REPO))
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.splitlines() == ['error: --dask needs the optional dask extra, which is not installed: '
                                        'pip install "lightcnn[dask]" (or pip install "dask[distributed]")']


def test_dask_options_that_cannot_work_are_usage_errors(workspace, capsys):
    weights, imgs = str(workspace / "tiny.h5"), str(workspace / "imgs")
    assert predict_main(["--weights", weights, "--dask", imgs]) == 2  # a bare --dask swallowed the folder
    assert "expected local, local:N or a scheduler address" in capsys.readouterr().err
    assert predict_main(["--weights", weights, imgs, "--resume"]) == 2
    assert "--resume needs --out DIR" in capsys.readouterr().err
    assert predict_main(["--weights", weights, imgs, "--dask", "local:0"]) == 2


def _finetune(workspace, out, *extra):
    from lightcnn.finetune import main as finetune_main

    return finetune_main([str(workspace / "data"), "--weights", str(workspace / "tiny.h5"), "--out", str(out),
                          "--cache-dir", str(out.parent / f"cache-{out.name}"), "--epochs", "3", "--bootstrap", "0",
                          "-q", *extra])


def _same_run(a, b):
    """Two run folders hold the same report (timings and paths aside) and bit-equal best.h5 tensors."""
    ra, rb = (json.loads((d / "report.json").read_text()) for d in (a, b))
    for r in (ra, rb):
        r.pop("timings", None), r.pop("best_h5", None)
    assert ra == rb
    ta, tb = read_checkpoint(a / "best.h5").tensors, read_checkpoint(b / "best.h5").tensors
    assert ta.keys() == tb.keys() and all(np.array_equal(ta[k], tb[k]) for k in ta)


def test_kfold_and_seeds_on_dask_give_the_sequential_results(cluster, workspace, tmp_path, monkeypatch):
    _, address = cluster
    monkeypatch.setenv("LIGHTCNN_ENGINE", "numpy")  # the workers' engine: the same arithmetic on both sides
    assert _finetune(workspace, tmp_path / "seq", "--kfold", "3") == 0
    assert _finetune(workspace, tmp_path / "par", "--kfold", "3", "--dask", address) == 0
    for i in (1, 2, 3):
        _same_run(tmp_path / "seq" / f"fold{i}", tmp_path / "par" / f"fold{i}")
    seq, par = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("seq", "par"))
    assert seq["kfold"] == par["kfold"] and seq["folds"] == par["folds"]

    assert _finetune(workspace, tmp_path / "seeds-seq", "--seeds", "1,2", "--split", "random") == 0
    assert _finetune(workspace, tmp_path / "seeds-par", "--seeds", "1,2", "--split", "random",
                     "--dask", address) == 0
    for s in (1, 2):
        _same_run(tmp_path / "seeds-seq" / f"seed{s}", tmp_path / "seeds-par" / f"seed{s}")
    seq, par = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("seeds-seq", "seeds-par"))
    assert seq["seed_summary"] == par["seed_summary"] and seq["seed_summary"]["accuracy"]["n"] == 2
    # --resume with every seed done recomputes nothing and writes the same summary
    assert _finetune(workspace, tmp_path / "seeds-par", "--seeds", "1,2", "--split", "random", "--resume",
                     "--dask", address) == 0
    assert json.loads((tmp_path / "seeds-par" / "report.json").read_text())["seed_summary"] == par["seed_summary"]


def test_tune_keeps_trials_in_flight_logs_each_and_resumes(cluster, workspace, tmp_path, monkeypatch, capsys):
    from lightcnn.tune.__main__ import main as tune_main

    _, address = cluster
    monkeypatch.setenv("LIGHTCNN_ENGINE", "numpy")
    common = [str(workspace / "data"), "--weights", str(workspace / "tiny.h5"), "--space",
              "lr=1e-3:1e-1:log, batch=8|16", "--epochs", "3", "--initial", "3", "--split", "random",
              "--cache-dir", str(tmp_path / "cache"), "-q"]
    assert tune_main([*common, "--trials", "4", "--out", str(tmp_path / "seq")]) == 0
    assert tune_main([*common, "--trials", "4", "--out", str(tmp_path / "par"), "--dask", address,
                      "--parallel", "2"]) == 0
    logs = {}
    for name in ("seq", "par"):
        lines = (tmp_path / name / "run0" / "trials.jsonl").read_text().splitlines()
        logs[name] = [json.loads(line) for line in lines[1:]]
    assert [r["trial"] for r in logs["par"]] == [0, 1, 2, 3]  # numbered as results arrived
    # the Sobol design is handed out whole either way; parallel results are logged in arrival order, so a
    # GP suggestion dispatched after the second result may arrive before the third design point
    seq_design = {json.dumps(r["x"]) for r in logs["seq"][:3]}
    par_points = {json.dumps(r["x"]): r["y"] for r in logs["par"]}
    assert seq_design <= set(par_points)
    # a design point and its score are the same wherever the trial ran
    seq_y = {json.dumps(r["x"]): r["y"] for r in logs["seq"][:3]}
    assert all(par_points[x] == seq_y[x] for x in seq_design)
    assert tune_main([*common, "--trials", "6", "--out", str(tmp_path / "par"), "--dask", address,
                      "--parallel", "2", "--resume"]) == 0
    lines = (tmp_path / "par" / "run0" / "trials.jsonl").read_text().splitlines()
    assert [json.loads(line)["x"] for line in lines[1:5]] == [r["x"] for r in logs["par"]]  # replayed, kept
    assert len(lines) == 1 + 6
    assert "2 trials evaluated (4 replayed from the log)" in capsys.readouterr().out


def test_minimize_parallel_hands_out_the_design_once_and_resumes(tmp_path):
    """The asynchronous loop itself, on threads (no Dask needed): P in flight, every point once, resume."""
    import concurrent.futures

    from lightcnn.tune import Optimizer, Real, minimize, minimize_parallel, timed

    def branin(x):
        a, b = x
        return (b - 5.1 / (4 * np.pi ** 2) * a * a + 5 / np.pi * a - 6) ** 2 + 10 * (1 - 0.125 / np.pi) * np.cos(a) + 10

    space = [Real(-5, 10), Real(0, 15)]
    opt = Optimizer(space, n_initial=4, seed=0)
    design = opt.ask(n_points=4)
    assert opt.ask(pending=design[:2]) == design[2]  # pending design points are not handed out again
    assert opt.ask(pending=None) == opt.ask() == design[0]  # without pending: by position, as before
    seq = minimize(branin, space, n_calls=10, n_initial=4, seed=0)
    log = tmp_path / "trials.jsonl"
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        def submit(x):
            return pool.submit(timed, branin, x)

        par = minimize_parallel(submit, space, n_calls=7, n_parallel=2, n_initial=4, seed=0, log_path=log)
        assert len(par.x_iters) == 7
        par = minimize_parallel(submit, space, n_calls=10, n_parallel=2, n_initial=4, seed=0, log_path=log,
                                resume=True)
    assert len(par.x_iters) == 10 and len({tuple(x) for x in par.x_iters}) == 10
    assert set(map(tuple, seq.x_iters[:4])) <= set(map(tuple, par.x_iters))  # the whole design, each point once
    assert all(branin(x) == y for x, y in zip(par.x_iters, par.func_vals))
