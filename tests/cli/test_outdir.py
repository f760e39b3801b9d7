"""The output-folder owner (flowkern/outdir.py) and what every command gets from it: one run per folder (real
processes: the second is refused naming the first's pid, the first completes; a SIGKILL leaves no stale lock and the
rerun resumes), only its own kind of folder (another command's result or a user's files are never touched, not even
with --overwrite), an empty path refused, a location proven writable by a probe before any model loads (/proc, /sys,
a symlink loop), the leftovers of killed runs removed, ``score --out`` never an input, and OS errors (a full disk:
a real tmpfs where the test may mount one, else an injected ENOSPC) as one line, exit 1, the answers kept."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import flowkern.hf.loading
from flowkern import _io, outdir
from flowkern.cli import main
from flowkern.eval.answers import ANSWERS_FILE, METRICS_FILE, SETTINGS_FILE
from tests.fixtures import save_eval_llava, save_image, slowed_flowkern, write_pope

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny LLaVA and 6 POPE questions on 3 images."""
    root = tmp_path_factory.mktemp("outdir")
    save_eval_llava(root / "llava")
    for i in range(3):
        save_image(root / "val2014" / f"COCO_val2014_{i:012d}.jpg", i)
    write_pope(root / "pope", "random", [(q, f"COCO_val2014_{q % 3:012d}.jpg", "dog", "yes" if q % 2 else "no")
                                         for q in range(1, 7)])
    return root


def _eval(files: Path, out: Path | str, *extra: str) -> list[str]:
    return ["eval", "--model", str(files / "llava"), "--task", "pope", "--data", str(files / "pope"), "--images",
            str(files / "val2014"), "--max-new-tokens", "2", "--device", "cpu", "--batch-size", "2", "--out", str(out),
            *extra]


def _sweep(files: Path, out: Path | str, *extra: str) -> list[str]:
    return ["sweep", "--model", str(files / "llava"), "--task", "pope", "--data", str(files / "pope"), "--images",
            str(files / "val2014"), "--max-new-tokens", "2", "--device", "cpu", "--layers", "3", "--limit", "2",
            "--out", str(out), *extra]


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


def _one_line(code: int, err: str, expected: int, *needles: str) -> str:
    lines = err.strip().splitlines()
    assert code == expected and len(lines) == 1 and "Traceback" not in err, (code, err)
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def no_model(monkeypatch):
    """Any model load fails the test: the refusals below must come before it."""
    def load(*a, **k):
        raise AssertionError("a model was loaded before the output location was checked")

    monkeypatch.setattr(flowkern.hf.loading, "load_model", load)


# ----------------------------------------------------------------------------------------------------------
# where: empty path, probe, kind -- all before any model loads, nothing written


def test_bad_locations_are_refused_before_the_model_loads(files, tmp_path, capsys, no_model):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "a_file").write_text("x")
    places = [("", "empty path"), ("/proc/flowkern-out", "/proc/flowkern-out"), ("/sys/flowkern-out", "/sys"),
              (str(tmp_path / "loop" / "run"), "loop"), (str(tmp_path / "a_file" / "run"), "not a directory"),
              (str(tmp_path / "a_file"), "is a file")]
    before = _tree(tmp_path)
    for command in (_eval, _sweep):
        for place, needle in places:
            code = main(command(files, place))
            _one_line(code, capsys.readouterr().err, 2, "--out", needle)
    for argv in (["demo", "--quick", "--out", "/proc/flowkern-demo"], ["shapes", "--task", "pope", "--out", ""],
                 ["shapes", "--task", "pope", "--out", str(tmp_path / "loop")],
                 ["score", "--task", "pope", "--data", str(files / "pope"), "--predictions", str(tmp_path / "a_file"),
                  "--out", "/proc/flowkern-metrics.json"]):
        _one_line(main(argv), capsys.readouterr().err, 2, "--out")
    assert _tree(tmp_path) == before and not Path("/proc/flowkern-out").exists()


def test_only_its_own_kind_of_folder_and_never_a_users_files(files, tmp_path, capsys, no_model):
    user = tmp_path / "user"
    user.mkdir()
    (user / "results.jsonl").write_text('{"mine": 1}\n')
    (user / "cliff.json").write_text("{}\n")
    an_eval = tmp_path / "an_eval"
    an_eval.mkdir()
    (an_eval / SETTINGS_FILE).write_text('{"settings": {}}\n')
    a_sweep = tmp_path / "a_sweep"
    a_sweep.mkdir()
    (a_sweep / "sweep.json").write_text('{"settings": {}}\n')
    before = _tree(tmp_path)
    cases = [(_sweep(files, user, "--overwrite"), "not a flowkern result"),
             (_eval(files, user, "--overwrite"), "not a flowkern result"),
             (_sweep(files, an_eval, "--overwrite"), "holds the result of a flowkern eval run, not of flowkern sweep"),
             (_eval(files, a_sweep, "--overwrite"), "holds the result of a flowkern sweep run, not of flowkern eval"),
             (["demo", "--quick", "--overwrite", "--out", str(an_eval)], "not of flowkern demo"),
             (["shapes", "--task", "pope", "--out", str(user)], "not a flowkern result")]
    for argv, needle in cases:
        _one_line(main(argv), capsys.readouterr().err, 2, "--out", needle, "nothing in it was changed")
    assert _tree(tmp_path) == before and not any(p.name == outdir.LOCK_FILE for p in tmp_path.rglob("*"))


def test_score_out_is_never_an_input(files, tmp_path, capsys):
    predictions = tmp_path / "answers.jsonl"
    predictions.write_text('{"question_id": 1, "text": "yes"}\n')
    (tmp_path / "link.jsonl").symlink_to(predictions)
    os.link(predictions, tmp_path / "hard.jsonl")
    data = files / "pope" / "coco_pope_random.json"
    before = predictions.read_bytes(), data.read_bytes()
    for out, given, needle in ((predictions, data, "is the --predictions file"),
                               (tmp_path / "link.jsonl", data, "is the --predictions file"),
                               (tmp_path / "hard.jsonl", data, "is the --predictions file"),
                               (tmp_path / "." / "answers.jsonl", data, "is the --predictions file"),
                               (data, data, "is the --data file"),
                               (data, data.parent, "is a file of the --data folder")):
        argv = ["score", "--task", "pope", "--data", str(given), "--predictions", str(predictions), "--out", str(out),
                "--overwrite"]
        _one_line(main(argv), capsys.readouterr().err, 2, needle, "choose another --out")
    assert (predictions.read_bytes(), data.read_bytes()) == before


# ----------------------------------------------------------------------------------------------------------
# one run per folder: real processes


def _start(files: Path, out: Path, delay: float, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(slowed_flowkern("flowkern.eval.run", _eval(files, out, *extra), delay), env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _start_held(files: Path, out: Path, go: Path) -> subprocess.Popen:
    """``flowkern eval`` in a subprocess whose batches after the first wait for the file ``go`` to appear."""
    code = ("import os, sys, time\n"
            "import flowkern.eval.run as m\n"
            "_gen, calls = m.generate_answers, []\n"
            "def held(*a, **k):\n"
            "    calls.append(1)\n"
            "    deadline = time.monotonic() + 120\n"
            f"    while len(calls) > 1 and not os.path.exists({str(go)!r}) and time.monotonic() < deadline:\n"
            "        time.sleep(0.05)\n"
            "    return _gen(*a, **k)\n"
            "m.generate_answers = held\n"
            "from flowkern.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    return subprocess.Popen([sys.executable, "-c", code, *_eval(files, out)], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_lines(proc: subprocess.Popen, answers: Path, n: int) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:
        if answers.is_file() and answers.read_bytes().count(b"\n") >= n:
            return
        time.sleep(0.02)
    raise AssertionError(f"no {n} answer lines: {proc.poll()} {proc.stderr.read() if proc.poll() is not None else ''}")


def test_second_run_is_refused_naming_the_first_which_completes(files, tmp_path, capsys):
    out, go = tmp_path / "shared", tmp_path / "go"
    first = _start_held(files, out, go)
    try:
        _wait_lines(first, out / ANSWERS_FILE, 2)
        holder = json.loads((out / outdir.LOCK_FILE).read_text())
        assert holder["pid"] == first.pid and holder["kind"] == "eval" and "eval" in holder["command"]
        second = subprocess.run([sys.executable, "-m", "flowkern.cli", *_eval(files, out)], env=_env(),
                                capture_output=True, text=True, timeout=120)
        line = _one_line(second.returncode, second.stderr, 2, "--out", "in use by another flowkern run",
                         f"pid {first.pid}")
        assert "since" in line and first.poll() is None  # refused while the first still runs
        go.touch()
        _, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err
    lines = (out / ANSWERS_FILE).read_text().splitlines()
    assert len(lines) == 6 and len({json.loads(x)["question_id"] for x in lines}) == 6  # nothing interleaved
    assert not (out / outdir.LOCK_FILE).exists()  # released: the folder holds the result only
    alone = tmp_path / "alone"
    assert main(_eval(files, alone)) == 0
    capsys.readouterr()
    assert (out / METRICS_FILE).read_text() == (alone / METRICS_FILE).read_text()


def test_sigkill_leaves_no_stale_lock_and_the_rerun_resumes(files, tmp_path, capsys):
    out = tmp_path / "killed"
    proc = _start(files, out, 1.0)
    try:
        _wait_lines(proc, out / ANSWERS_FILE, 2)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    kept = (out / ANSWERS_FILE).read_text().splitlines()
    assert (out / outdir.LOCK_FILE).exists() and 2 <= len(kept) < 6  # the file stays, the lock went with the process
    (out / f".{METRICS_FILE}.abcd1234.tmp").write_text("{")  # an atomic write's temporary file a kill left
    assert main(_eval(files, out)) == 0
    stdout = capsys.readouterr().out
    assert f"{len(kept)} already answered" in stdout
    assert (out / ANSWERS_FILE).read_text().splitlines()[: len(kept)] == kept
    assert sorted(p.name for p in out.iterdir()) == sorted([ANSWERS_FILE, SETTINGS_FILE, METRICS_FILE])


# ----------------------------------------------------------------------------------------------------------
# atomic result folders: the lock travels with the folder, a killed run's leftovers are cleaned up


def test_atomic_folder_leftovers_of_killed_runs_are_removed(tmp_path):
    target = tmp_path / "demo"
    dead = 2 ** 22 + 12345  # above the default pid_max: no such process
    with _io.AtomicDir(target, info={"command": "flowkern demo"}) as tmp:
        (tmp / "report.html").write_text("one")
    assert json.loads((target / _io.MANIFEST).read_text())["files"] == {"report.html": 3}
    assert not (target / outdir.LOCK_FILE).exists()
    stale = tmp_path / f".demo.tmp-{dead}-abc"
    stale.mkdir()
    (stale / "half.html").write_text("x")
    # killed between its two renames: the previous result moved aside, no target
    os.replace(target, tmp_path / f".demo.old-{dead}-xyz")
    with _io.AtomicDir(target, info={"command": "flowkern demo"}) as tmp:
        assert (target / "report.html").read_text() == "one"  # put back before this run's work
        (tmp / "report.html").write_text("two")
    assert (target / "report.html").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]
    with pytest.raises(outdir.OutputError, match="a flowkern demo run, not of flowkern cam"):
        with _io.AtomicDir(target, info={"command": "flowkern cam"}):
            pass
    with outdir.claim(target, "demo", resume=False, overwrite=True) as owned:  # this process's own claim passes
        assert json.loads((target / outdir.LOCK_FILE).read_text())["pid"] == os.getpid() and owned.path == target
        assert _io.check_output_dir(target, overwrite=True, kind="demo") == target
    fd = os.open(target / outdir.LOCK_FILE, os.O_RDWR | os.O_CREAT)  # another process's demo running there now
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, json.dumps({"kind": "demo", "pid": 4242, "host": "elsewhere", "since": "then"}).encode())
        with pytest.raises(outdir.OutputError, match="in use by another flowkern run: pid 4242 on elsewhere"):
            _io.check_output_dir(target, overwrite=True, kind="demo")  # the check before any work sees it
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------------------
# OS errors: one line naming the path, exit 1, what was written kept, the rerun resumes


def test_injected_disk_full_mid_run_keeps_the_answers(files, tmp_path, capsys, monkeypatch):
    import flowkern.eval.run as run

    out = tmp_path / "full"
    real, calls = run.append_lines, []

    def append(path, records):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as os.write on a descriptor: no file name
        return real(path, records)

    monkeypatch.setattr(run, "append_lines", append)
    code = main(_eval(files, out))
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]  # after transformers' loading bar
    assert code == 1 and "Traceback" not in err and line.startswith("flowkern eval: error:"), err
    assert str(out) in line and "No space left on device" in line and "kept" in line
    assert len((out / ANSWERS_FILE).read_text().splitlines()) == 2
    monkeypatch.undo()
    assert main(_eval(files, out)) == 0
    assert "2 already answered" in capsys.readouterr().out


def test_real_full_disk_on_a_small_tmpfs(files, tmp_path, capsys):
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    # 3 pages: the lock file, run.json and the answers fit; the metrics file does not
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (the in-process ENOSPC test covers the class)")
    try:
        out = mnt / "run"
        proc = subprocess.run([sys.executable, "-m", "flowkern.cli", *_eval(files, out)], env=_env(),
                              capture_output=True, text=True, timeout=120)
        err = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert "No space left on device" in err and str(out) in err
        kept = (out / ANSWERS_FILE).read_text().splitlines()
        assert len(kept) == 6 and not (out / METRICS_FILE).exists()
        subprocess.run(["mount", "-o", "remount,size=1m", str(mnt)], check=True)
        assert main(_eval(files, out)) == 0
        assert "6 already answered" in capsys.readouterr().out and (out / METRICS_FILE).is_file()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
