"""Timing that a loaded machine cannot fool: variants interleaved, rounds repeated until each minimum is stable, the
spread printed, and the machine's load watched.

Each round runs every variant once, in a rotated order. After `min_rounds`, rounds go on until no variant's best time
fell by more than `rtol` over the last `stable` rounds (or `max_rounds` is reached). A variant's time is its best
round; its spread is its median over its best. The load is the CPU time the machine's other processes used while the
rounds ran (/proc/stat, less this process's own), in cores: a run during which other work held more cores than ours
left free, or whose spread is wide, is flagged as NOT A RESULT, so that its ratios cannot be read as measurements.
"""
import os, statistics, time
import torch


def busy_seconds() -> float|None:
    "CPU seconds all processes of the machine have used since boot (/proc/stat), None where there is no /proc"
    try: f = open('/proc/stat').readline().split()
    except OSError: return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf('SC_CLK_TCK')


def rounds(variants:dict, min_rounds:int=3, max_rounds:int=15, rtol:float=0.02, stable:int=2) -> dict:
    "{name: [seconds of each round]} for `variants` {name: f()} (each `f` returns the seconds it measured or None)"
    times, names = {k: [] for k in variants}, list(variants)
    for r in range(max_rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            t = variants[k]()
            times[k].append(time.perf_counter() - t0 if t is None else t)
        if r + 1 >= max(min_rounds, stable + 1) and all(
                min(v[:-stable]) - min(v) <= rtol * min(v) for v in times.values()): break
    return times


class Watch:
    "Context that measures how many cores other processes kept busy while the timed work ran"
    def __init__(self, threads:int|None=None): self.threads = threads or torch.get_num_threads()
    def __enter__(self):
        self.t0, self.busy0, self.ours0 = time.perf_counter(), busy_seconds(), time.process_time()
        return self
    def __exit__(self, *exc):
        wall, busy = time.perf_counter() - self.t0, busy_seconds()
        ours = time.process_time() - self.ours0
        self.others = None if busy is None else max(busy - self.busy0 - ours, 0.) / wall


def summary(times:dict) -> dict:
    "{name: (best, spread)}: best round in seconds, median over best"
    return {k: (min(v), statistics.median(v) / min(v)) for k, v in times.items()}


def busy(watch:Watch, cores:int|None=None) -> bool:
    "Whether other processes kept busy more of the cores than our threads left free"
    cores = cores or os.cpu_count()
    return watch.others is not None and watch.others > max(cores - watch.threads, 0) + 0.25

def load_line(watch:Watch, cores:int|None=None) -> str:
    "What else the machine ran while `watch` watched"
    others = 'an unknown number of' if watch.others is None else f'{watch.others:.2f}'
    return (f"other processes kept {others} cores busy on average, beside our {watch.threads} threads on "
            f"{cores or os.cpu_count()} cores")

def verdict(times:dict, watch:Watch, cores:int|None=None, max_spread:float=1.25) -> str:
    "One line: how many rounds, the widest spread, the load, and whether the ratios can be read as results"
    s = summary(times)
    worst = max(s, key=lambda k: s[k][1])
    loaded, wide = busy(watch, cores), s[worst][1] > max_spread
    flag = ('NOT A RESULT: ' + ' and '.join(w for w, b in (('other work held the cores', loaded),
                                                          (f'a spread above {max_spread}', wide)) if b)
            if loaded or wide else 'quiet enough: the ratios are results')
    return (f"{min(map(len, times.values()))}–{max(map(len, times.values()))} interleaved rounds; widest spread "
            f"(median / best) {s[worst][1]:.2f} ({worst}); {load_line(watch, cores)}; {flag}")
