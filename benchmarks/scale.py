"""Ray against the in-process path on this machine: `run` and `landscape`, serial at one and two threads, `--workers N`.

    python benchmarks/scale.py [--workers 2] [--epochs 1] [--resolution 25] [--skip quick,fmnist,landscapes]

Every variant is the command line itself, in a fresh process and a fresh results folder, so that the times include what
a user waits for: the interpreter, torch's import, Ray's start-up. Workloads: the `quick` preset (seven digits runs);
the `fmnist` preset for one seed (six Fashion-MNIST runs, `--epochs` each); the landscape (`--resolution` squared) of
one trained Fashion-MNIST run, and those of two. The serial path runs with `OMP_NUM_THREADS` 1 and 2 and the better
one is the baseline; `--workers N` runs N one-thread tasks. Then Ray's fixed costs: starting a local cluster, and a
task's round trip. Run it on an otherwise idle machine: the ratios mean nothing under load.
"""
import argparse, os, shutil, subprocess, sys, tempfile, time
from pathlib import Path

CLI = [sys.executable, '-c', 'from secondorder_cnn.cli import main; main()']


def timed(args:list, threads:int) -> float:
    "Wall seconds of `secondorder-cnn args` in a new process with `threads` torch threads"
    env = os.environ | dict(OMP_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    r = subprocess.run([*CLI, *map(str, args)], env=env, capture_output=True, text=True)
    if r.returncode: sys.exit(f"{' '.join(map(str, args))} failed:\n{r.stderr}")
    return time.perf_counter() - t0


def compare(name:str, make, args:list, workers:int) -> dict:
    "Serial at 1 and 2 threads and Ray with `workers` one-thread tasks, each in its own copy of what `make` prepares"
    times = {}
    for variant, threads, extra in (('serial, 1 thread', 1, []), ('serial, 2 threads', 2, []),
                                    (f'--workers {workers}', 1, ['--workers', workers])):
        out = make()
        times[variant] = timed([*args, '--out', out, *extra], threads)
        shutil.rmtree(Path(out).parent, ignore_errors=True)
    best = min(times['serial, 1 thread'], times['serial, 2 threads'])
    return dict(name=name, **times, speedup=best / times[f'--workers {workers}'])


def ray_overhead(workers:int) -> tuple[float, float, float]:
    "Seconds to start a local cluster, for a first task (a new worker), and per task after that"
    import ray
    t0 = time.perf_counter()
    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    t_init = time.perf_counter() - t0
    one = ray.remote(lambda: 1)
    t0 = time.perf_counter(); ray.get(one.remote()); t_first = time.perf_counter() - t0
    t0 = time.perf_counter(); ray.get([one.remote() for _ in range(100)]); t_task = (time.perf_counter() - t0) / 100
    ray.shutdown()
    return t_init, t_first, t_task


def main(workers=2, epochs=1, resolution=25, skip=''):
    skip, rows = set(skip.split(',')) - {''}, []
    fresh = lambda: Path(tempfile.mkdtemp())/'results'
    if 'quick' not in skip:
        rows.append(compare('quick preset (7 digits runs, 10 epochs)', fresh, ['run', '--preset', 'quick'], workers))
    if 'fmnist' not in skip:
        rows.append(compare(f'fmnist preset, one seed (6 runs, {epochs} epoch{"s" * (epochs > 1)})', fresh,
                            ['run', '--preset', 'fmnist', '--seeds', '0', '--epochs', epochs], workers))
    if 'landscape' not in skip:
        trained = fresh()
        timed(['run', '--preset', 'fmnist', '--optimizers', 'adam,sgd', '--seeds', '0', '--epochs', epochs,
               '--out', trained], 2)
        def copy():
            out = fresh()
            shutil.copytree(trained, out)
            return out
        rows.append(compare(f'landscape of 1 run ({resolution} × {resolution}, 2,000 samples)', copy,
                            ['landscape', '--optimizers', 'adam', '--resolution', resolution], workers))
        if 'landscapes' not in skip:
            rows.append(compare(f'landscapes of 2 runs ({resolution} × {resolution}, 2,000 samples)', copy,
                                ['landscape', '--resolution', resolution], workers))
        shutil.rmtree(trained.parent, ignore_errors=True)
    print(f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}; wall seconds of the command, process start "
          "included\n")
    print(f'| workload | serial, 1 thread | serial, 2 threads | --workers {workers} | '
          'speed-up over the better serial |')
    print('|---|---:|---:|---:|---:|')
    for r in rows:
        print(f"| {r['name']} | {r['serial, 1 thread']:.1f} | {r['serial, 2 threads']:.1f} | "
              f"{r[f'--workers {workers}']:.1f} | {r['speedup']:.2f}× |")
    t_init, t_first, t_task = ray_overhead(workers)
    print(f"\nRay's fixed costs: a local cluster of {workers} CPUs starts in {t_init:.1f} s, a first task "
          f"(a new worker) "
          f"takes {t_first:.2f} s, a task's round trip after that {1000 * t_task:.1f} ms")


if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--workers', type=int, default=2)
    p.add_argument('--epochs', type=int, default=1, help="epochs of each Fashion-MNIST run")
    p.add_argument('--resolution', type=int, default=25)
    p.add_argument('--skip', default='', help="workloads to leave out, comma-separated: quick, fmnist, "
                   "landscape (both landscape workloads), landscapes (the one of two runs)")
    main(**vars(p.parse_args()))
