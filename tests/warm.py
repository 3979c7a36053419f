"""`python SCRIPT ARGS` for the tests, without paying ~10 s of imports per run.

A script run is a child process forked from a server that imported torch, diffusers, transformers and peft
once (multiprocessing's forkserver). The child is still its own process, as `python SCRIPT ARGS` would be:
its own environment, working folder, argv, signal handlers, stdout / stderr and exit code; a fresh one for
every run. What a fresh interpreter decides at import time (thread count, hub offline mode, CUDA devices,
warning filters) is the server's, so a run that asks for other values there gets a real subprocess, as do
torchrun launches and the tests that signal a running process (they call subprocess themselves). The
server imports nothing the scripts do not import themselves, so a missing import still fails in the child.
Measured on 2 AVX2 EPYC cores: a 2-step smoke run of train_cifar.py 3.9 s this way, 14.1 s as a subprocess;
the suite (`python -m pytest -q`, the 2-D study first: conftest.py) 468 s, 829 s with every run a subprocess.
"""
import json
import multiprocessing
import os
import runpy
import subprocess
import sys
import tempfile
import traceback

# read when a module is imported, not when a script runs: the server's values, for every warm run
IMPORT_TIME_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                   "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
IMPORT_TIME_PREFIXES = ("HF_", "TRANSFORMERS", "DIFFUSERS", "CUDA", "OMP", "MKL")
PRELOAD = ["torch", "numpy", "PIL.Image", "tqdm", "matplotlib.figure", "torchvision", "diffusers",
           "diffusers.models.unets.unet_2d", "transformers", "peft", "safetensors.torch", "yoso"]
_server = {}                                            # the forkserver context and the environment it started with


def _script_main(script: str, args: list, env: dict, cwd: str, out: str, err: str, path: list) -> None:
    """In the forked child: become `python script *args` in `cwd` with `env`, stdout / stderr to files."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    sys.argv = [script, *args]
    sys.path[:] = [os.path.dirname(os.path.abspath(script)), *path]   # not the tests' folders: a fresh run's
    for fd, path in ((1, out), (2, err)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(f, fd)
        os.close(f)
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:                             # sys.exit(n) of the script: its exit code, as Python's
        code = e.code
    except BaseException:                               # an uncaught error: traceback, exit code 1, as Python's
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)                                      # multiprocessing ends the child with this exit code


def _start() -> dict:
    """The server, or {"ctx": None} where there is none (no forkserver on Windows; one that fails to start)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return {"ctx": None}
    old = dict(os.environ)
    os.environ.update(IMPORT_TIME_ENV)
    try:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        from multiprocessing import forkserver
        forkserver.ensure_running()                     # the server starts now, with this environment
        fresh = subprocess.run([sys.executable, "-c", "import sys, json; print(json.dumps(sys.path[1:]))"],
                               capture_output=True, text=True, check=True).stdout
        return dict(ctx=ctx, env=dict(os.environ), path=json.loads(fresh))     # sys.path past the script's folder
    except (OSError, ValueError, subprocess.SubprocessError):
        return {"ctx": None}
    finally:
        os.environ.clear()
        os.environ.update(old)


def run(script: str, args, env: dict, cwd: str, timeout: float) -> subprocess.CompletedProcess:
    """subprocess.run([sys.executable, script, *args], env=env, cwd=cwd, capture_output=True, text=True,
    timeout=timeout), from the warm server where `env` agrees with it on what is read at import time."""
    args = [str(a) for a in args]
    if not _server:
        _server.update(_start())
    keys = {k for k in {*env, *_server.get("env", {})} if k in IMPORT_TIME_ENV or k.startswith(IMPORT_TIME_PREFIXES)}
    if _server["ctx"] is None or any(env.get(k) != _server["env"].get(k) for k in keys):
        return subprocess.run([sys.executable, script, *args], env=env, cwd=cwd, capture_output=True, text=True,
                              timeout=timeout)
    with tempfile.TemporaryDirectory() as d:
        out, err = os.path.join(d, "stdout"), os.path.join(d, "stderr")
        p = _server["ctx"].Process(target=_script_main, args=(script, args, dict(env), cwd, out, err,
                                                              _server["path"]))
        p.start()
        p.join(timeout)
        if p.exitcode is None:
            p.kill()
            p.join()
            raise subprocess.TimeoutExpired([script, *args], timeout)
        read = lambda path: open(path, encoding="utf-8", errors="replace").read() if os.path.exists(path) else ""
        return subprocess.CompletedProcess([script, *args], p.exitcode, read(out), read(err))

