"""What SGE costs: ResNet50 vs SGE-ResNet50 (reference) vs SGE-ResNet50 (fused), side by side.

    python scripts/bench_sge.py                          # batch 16, 224 px, 5 repeats
    python scripts/bench_sge.py --batch 2 --img 64 --repeats 1 --steps 1 --measure train,infer
    python scripts/bench_sge.py --device cuda --batch 64 --amp float16 --channels-last
    python scripts/bench_sge.py --same-process --measure infer,train  # models share a process

Measurements (``--measure``): ``train`` (forward+backward+SGD step, eager, with peak
memory), ``infer`` (forward under no_grad, eval mode), ``compiled`` (the same train step
with whole-model ``torch.compile``: compile time and compiled step time). Each measurement
runs in its own subprocess (peak memory is per process; compile caches are not shared), the
three models interleaved within each repeat; figures are medians over repeats. A
measurement past ``--cap`` seconds is recorded as null (and not retried in later repeats).
Peak memory: peak RSS of the process on CPU, ``max_memory_allocated`` on CUDA. CPU seconds
(process time, all threads) per step are reported beside wall time: on a shared machine
they move less with other jobs' load.

Prints a table, then as its last line one JSON object with every figure and the ratios
``{fused,reference}_{train_time,peak_mem,infer_time,compiled_step,compile_time}_ratio``
(and ``_train_cpu_ratio``, ``_infer_cpu_ratio``)
(over ResNet50).

``--same-process`` holds every model in one process per measurement instead and alternates
their steps (rotating order), ``repeats * steps`` rounds. On a VM whose speed differs from
process to process (here +-5-10%, more than the effects measured), this separates what the
models cost from where each process happened to land; peak memory is not measured there.

Each time ratio also gets a 95% interval (``..._ratio_ci`` in the JSON): a paired bootstrap
over the rounds (``--same-process``) or repeats, resampling whole rounds so that both
models' steps from the same stretch of time stay together. Whether a ratio is under a
target such as issue 5's 1.03x is a question for the interval's upper end: on this 2-core
VM single steps of the same model vary by up to 10% (conv weight copies that take 1 to
28 ms; docs/benchmarks.md, "CPU, thirteenth session"). ``--variants`` may add
``resnet50_control``, a second ResNet50: its ratio (``control_...``) shows how far the
machine alone moves a ratio in the same run.

One process's interval does not hold what differs between processes (the heap's layout,
where the VM's neighbours are): on this VM two same-process runs of the same command gave
channels_last inference 1.098x (interval 1.077-1.119x) and 0.988x (0.976-1.009x); five
more had intervals within 0.996-1.114x. ``--same-process --processes N`` runs the whole
measurement in N fresh processes, one after another: the figures are medians over all
their rounds, each process's own ratio is listed (``..._ratio_by_process``), and the
interval resamples processes and then rounds within each, so it widens with the spread
between processes.

On a GPU, ``--cuda-graph`` captures each model's whole step (forward, backward, SGD) as one
CUDA graph and times its replays: the GPU's own time for the step, with no host time in
it. Against the plain run this says how much of a ratio is the host issuing work (the
fused SGE's step waited on the host on an H200; docs/benchmarks.md, "Fourth GPU
session"). ``--compile-mode`` passes a mode to ``torch.compile`` (``reduce-overhead``
also uses CUDA graphs, through Inductor).

``--keep-freed-memory`` sets glibc's malloc in each worker as ``train.py`` and ``eval.py``
do on CPUs (``train.keep_freed_memory``): freed feature maps stay in the process instead of
being faulted in again every step. Without it the workers run with the C library's defaults.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {  # row name -> (model name, sge_impl)
    "resnet50": ("resnet50", None),
    "sge_resnet50_reference": ("sge_resnet50", "reference"),
    "sge_resnet50_fused": ("sge_resnet50", "fused"),
    # A second ResNet50, built and timed like the others: its ratio to the first is what
    # the machine alone moves a ratio by (a same-model control; not run unless asked). In
    # one process its compile reuses the first's compiled graphs (its compile time is ~0).
    "resnet50_control": ("resnet50", None),
}
DEFAULT_VARIANTS = "resnet50,sge_resnet50_reference,sge_resnet50_fused"
# variant -> the prefix of its ratios' keys in the JSON
RATIO_PREFIX = {"sge_resnet50_fused": "fused", "sge_resnet50_reference": "reference",
                "resnet50_control": "control"}
MEASURES = ("train", "infer", "compiled")
# figure -> (measurement, field in the worker's answer)
FIGURES = {
    "train_time": ("train", "step_s"),
    "train_cpu": ("train", "cpu_s"),
    "peak_mem": ("train", "peak_mem_mb"),
    "infer_time": ("infer", "step_s"),
    "infer_cpu": ("infer", "cpu_s"),
    "compile_time": ("compiled", "compile_s"),
    "compiled_step": ("compiled", "step_s"),
}
TIMES = ("train_time", "infer_time", "compiled_step")  # figures with per-round values
# The command-line options every worker's spec carries (``collect`` adds ``steps``).
WORKER_OPTIONS = ("batch", "img", "warmup", "threads", "device", "amp", "channels_last",
                  "cuda_graph", "compile_mode", "keep_freed_memory")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16, help="images per step")
    ap.add_argument("--img", type=int, default=224, help="image side in pixels")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved repeats (medians)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per measurement")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps before timing")
    ap.add_argument("--measure", default="train,infer,compiled",
                    help=f"comma-separated subset of {','.join(MEASURES)}")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS,
                    help=f"comma-separated subset of {','.join(VARIANTS)}")
    ap.add_argument("--cap", type=float, default=900.0, help="seconds per measurement")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (CPU)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--amp", default="none", choices=("none", "bfloat16", "float16"),
                    help="autocast dtype")
    ap.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    ap.add_argument("--same-process", action="store_true",
                    help="all models in one process per measurement, steps alternating "
                         "(no per-process spread; peak memory not measured)")
    ap.add_argument("--processes", type=int, default=1,
                    help="with --same-process: that many fresh processes per measurement, "
                         "their rounds pooled (the interval resamples processes too)")
    ap.add_argument("--cuda-graph", action="store_true",
                    help="GPU only: capture each eager step as one CUDA graph and time its "
                         "replays (no host time); not with float16 AMP (GradScaler syncs)")
    ap.add_argument("--compile-mode", default=None,
                    help="torch.compile mode for --measure compiled (e.g. reduce-overhead, "
                         "max-autotune-no-cudagraphs); default: torch's default")
    ap.add_argument("--keep-freed-memory", action="store_true",
                    help="CPU, glibc: keep freed memory in each process, as train.py and "
                         "eval.py do by default (train.keep_freed_memory)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.processes < 1:
        ap.error(f"--processes must be at least 1, got {args.processes}")
    if args.processes > 1 and not args.same_process:
        ap.error("--processes is for --same-process (without it every measurement already "
                 "runs in its own process, once per repeat)")
    if args.cuda_graph:
        if args.device.split(":")[0] != "cuda":
            ap.error("--cuda-graph needs --device cuda: CUDA graphs record GPU work")
        if args.amp == "float16":
            ap.error("--cuda-graph: float16 AMP's GradScaler reads its inf check on the host "
                     "every step, which a CUDA graph cannot capture; use --amp bfloat16")
        if "compiled" in args.measure.split(","):
            ap.error("--cuda-graph captures eager steps; for compiled ones use "
                     "--compile-mode reduce-overhead")
    for name, allowed in (("measure", MEASURES), ("variants", VARIANTS)):
        chosen = getattr(args, name).split(",")
        bad = [c for c in chosen if c not in allowed]
        if bad:
            ap.error(f"--{name}: unknown {bad}; choose from {','.join(allowed)}")
        setattr(args, name, chosen)
    return args


# ---------------------------------------------------------------------------------------
# Worker: one measurement in this process.

def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _setup(spec: dict) -> SimpleNamespace:
    """What every model of a worker process shares: ``torch``, ``device``, memory format
    ``fmt``, the batch ``x`` and ``labels``, ``autocast`` and ``sync``."""
    import torch
    sys.path.insert(0, str(ROOT))

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    device = torch.device(spec["device"])
    if spec.get("keep_freed_memory") and device.type == "cpu":
        from sge.builders import glibc_keep_freed_memory
        if not glibc_keep_freed_memory():
            raise SystemExit("--keep-freed-memory: this C library has no glibc mallopt")
    fmt = torch.channels_last if spec["channels_last"] else torch.contiguous_format
    x = torch.randn(spec["batch"], 3, spec["img"], spec["img"], device=device)
    x = x.contiguous(memory_format=fmt)
    labels = torch.randint(0, 1000, (spec["batch"],), device=device)
    amp_dtype = getattr(torch, spec["amp"]) if spec["amp"] != "none" else None
    # Captured into a CUDA graph, autocast runs without its cast cache, as PyTorch's notes on
    # graphs ask (make_graphed_callables): cached casts must not outlive the capture.
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None,
                              cache_enabled=not spec.get("cuda_graph", False))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    return SimpleNamespace(torch=torch, device=device, fmt=fmt, x=x, labels=labels,
                           autocast=autocast, sync=sync)


def _step_fn(spec: dict, variant: str, env: SimpleNamespace):
    """One model of ``variant`` set up for ``spec["measure"]``; returns its step function."""
    import models

    torch, x, labels, autocast = env.torch, env.x, env.labels, env.autocast
    name, impl = VARIANTS[variant]
    kwargs = {"sge_impl": impl} if impl else {}
    model = models.create_model(name, **kwargs).to(env.device, memory_format=env.fmt)
    train = spec["measure"] != "infer"
    model.train(train)
    net = model
    if spec["measure"] == "compiled":
        net = torch.compile(model, mode=spec.get("compile_mode"))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler(env.device.type, enabled=spec["amp"] == "float16")
    graphed = spec.get("cuda_graph", False)

    def step():
        if not train:
            with torch.no_grad(), autocast:
                net(x)
            return
        with autocast:
            loss = torch.nn.functional.cross_entropy(net(x), labels)
        if not graphed:  # captured, the backward writes the gradients (see _graphed)
            opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    if graphed:
        return _graphed(step, opt, torch)
    return step


def _graphed(step, opt, torch):
    """``step`` captured as one CUDA graph; returns its replay. As in PyTorch's whole-network
    capture recipe: warm-up steps on a side stream (they also create SGD's momentum
    buffers), then the gradients set to None, so that the captured backward writes them
    (into the graph's memory) instead of adding to them, on every replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def _timed(step, sync) -> tuple[float, float]:
    """``(wall s, process CPU s)`` of one step."""
    sync()
    t0, c0 = time.perf_counter(), time.process_time()
    step()
    sync()
    return time.perf_counter() - t0, time.process_time() - c0


def run_worker(spec: dict) -> dict:
    env = _setup(spec)
    torch, cuda = env.torch, env.device.type == "cuda"
    step = _step_fn(spec, spec["variant"], env)
    setup_mb = _rss_mb()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, cpu_times = zip(*(_timed(step, env.sync)
                             for _ in range(spec["warmup"] + spec["steps"])))
    timed = times[spec["warmup"]:] or times
    out = {"step_s": statistics.median(timed), "first_step_s": times[0],
           "cpu_s": statistics.median(cpu_times[spec["warmup"]:] or cpu_times)}
    if spec["measure"] == "compiled":
        out["compile_s"] = max(times[0] - out["step_s"], 0.0)
    if cuda:
        out["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        out["peak_mem_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        out["setup_mem_mb"] = setup_mb
    return out


def run_same_process(spec: dict) -> dict:
    """Every variant in this one process, one step each per round in rotating order:
    ``{variant: [{"step_s": .., "cpu_s": ..} per round]}`` (the first round's with
    ``compile_s`` when compiled). Peak memory cannot be told apart per model here."""
    env = _setup(spec)
    steps, first, out = {}, {}, {}
    for v in spec["variants"]:  # build and warm up (compile) one model after another
        steps[v] = _step_fn(spec, v, env)
        first[v] = [_timed(steps[v], env.sync)[0] for _ in range(max(spec["warmup"], 1))][0]
        out[v] = []
    order = list(spec["variants"])
    # One untimed round: models built from the same classes share torch.compile's caches
    # per function, so each model's first step after another's compile recompiles.
    for v in order:
        steps[v]()
    for r in range(spec["rounds"]):
        for v in order[r % len(order):] + order[:r % len(order)]:
            wall, cpu = _timed(steps[v], env.sync)
            out[v].append({"step_s": wall, "cpu_s": cpu})
    if spec["measure"] == "compiled":
        for v, rounds in out.items():
            median = statistics.median(r["step_s"] for r in rounds)
            rounds[0]["compile_s"] = max(first[v] - median, 0.0)
    return out


# ---------------------------------------------------------------------------------------
# Driver: interleave subprocesses, take medians, print.

def measure(spec: dict, cap: float) -> dict | None:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    # A fresh Inductor/Triton cache per process: an on-disk cache hit is not a compile.
    with tempfile.TemporaryDirectory(prefix="bench_sge_") as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache,
               "TRITON_CACHE_DIR": os.path.join(cache, "triton")}
        # Own session: on timeout the whole group goes, Inductor's compile workers included.
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                cwd=ROOT, env=env, start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=cap)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            stdout = None
    if stdout is None:
        print(f"  {spec.get('variant', 'same process')} {spec['measure']}: over the "
              f"{cap:.0f} s cap -> null", file=sys.stderr)
        return None
    if proc.returncode != 0:
        tail = "\n".join(stderr.strip().splitlines()[-5:])
        print(f"  {spec.get('variant', 'same process')} {spec['measure']}: failed -> null\n"
              f"{tail}", file=sys.stderr)
        return None
    return json.loads(stdout.strip().splitlines()[-1])


def _progress(total: int):
    """A tqdm bar over ``total`` measurements on stderr, or None without tqdm."""
    try:
        from tqdm import tqdm
    except ImportError:  # progress is a nicety
        return None
    return tqdm(total=total, desc="measurements", file=sys.stderr)


def collect(args) -> dict:
    base = {k: getattr(args, k) for k in ("steps", *WORKER_OPTIONS)}
    runs = {(v, m): [] for v in args.variants for m in args.measure}
    dead = set()  # measurements that hit the cap or failed once: not retried
    jobs = [(v, m) for m in args.measure for v in args.variants]
    bar = _progress(args.repeats * len(jobs))
    for r in range(args.repeats):
        # Rotate the order so no variant always runs right after the same neighbour.
        for v, m in jobs[r % len(jobs):] + jobs[:r % len(jobs)]:
            if (v, m) not in dead:
                res = measure({**base, "variant": v, "measure": m}, args.cap)
                if res is None:
                    dead.add((v, m))
                else:
                    runs[v, m].append(res)
            if bar:
                bar.update()
    if bar:
        bar.close()
    return _figures(args, runs, dead)


def _figures(args, runs: dict, dead: set) -> dict:
    """Per variant, each figure's median over the measurements in ``runs`` (None where a
    measurement is ``dead``), and the per-measurement step times (``_all``) with, from
    ``--processes``, the process each came from (``_process``)."""
    figures = {}
    for v in args.variants:
        figures[v] = {}
        for fig, (m, field) in FIGURES.items():
            kept = [r for r in runs.get((v, m), []) if field in r]
            vals = [r[field] for r in kept]
            ok = (v, m) not in dead and vals
            figures[v][fig] = statistics.median(vals) if ok else None
            if fig in TIMES:
                figures[v][fig + "_all"] = vals
                if args.processes > 1:
                    figures[v][fig + "_process"] = [r["process"] for r in kept]
    return figures


def collect_same_process(args) -> dict:
    """``collect``'s figures from one process per measurement holding every variant
    (``--same-process``): medians over ``repeats * steps`` rounds, peak memory null."""
    base = {k: getattr(args, k) for k in WORKER_OPTIONS}
    runs = {(v, m): [] for v in args.variants for m in args.measure}
    dead = set()
    bar = _progress(len(args.measure) * args.processes) if args.processes > 1 else None
    for m in args.measure:
        spec = {**base, "variants": args.variants, "measure": m,
                "rounds": args.repeats * args.steps}
        for p in range(args.processes):
            res = measure(spec, args.cap)
            if bar:
                bar.update()
            if res is None:  # a failed or capped process nulls the measurement (no partial pools)
                dead.update((v, m) for v in args.variants)
                break
            for v in args.variants:
                runs[v, m] += [{**r, "process": p} for r in res[v]]
    if bar:
        bar.close()
    return _figures(args, runs, dead)


def ratio_interval(base: list, other: list, level: float = 0.95, resamples: int = 2000,
                   seed: int = 0, process: list | None = None) -> list | None:
    """``[low, high]``: a paired bootstrap interval for ``median(other) / median(base)``,
    resampling round indices (both lists in round order, same length); None with fewer than
    3 rounds or unpaired lists. Fixed seed: the same figures give the same interval.
    ``process``: each round's process; with more than one, each resample draws processes
    (with replacement), then rounds within each drawn process (a two-stage bootstrap), so
    that the spread between processes is in the interval."""
    if len(base) != len(other) or len(base) < 3:
        return None
    if process is not None and len(process) != len(base):
        return None
    rng = random.Random(seed)
    n = len(base)
    blocks = _blocks(process or [])
    draws = []
    for _ in range(resamples):
        if len(blocks) > 1:
            idx = []
            for _ in blocks:
                block = blocks[rng.randrange(len(blocks))]
                idx += [block[rng.randrange(len(block))] for _ in block]
        else:
            idx = [rng.randrange(n) for _ in range(n)]
        denom = statistics.median(base[i] for i in idx)
        if denom > 0:
            draws.append(statistics.median(other[i] for i in idx) / denom)
    if not draws:
        return None
    draws.sort()
    tail = (1 - level) / 2
    return [round(draws[int(tail * (len(draws) - 1))], 4),
            round(draws[int((1 - tail) * (len(draws) - 1))], 4)]


def ratios(figures: dict) -> dict:
    out = {}
    base = figures.get("resnet50", {})
    for v, prefix in RATIO_PREFIX.items():
        for fig in FIGURES:
            a, b = figures.get(v, {}).get(fig), base.get(fig)
            out[f"{prefix}_{fig}_ratio"] = round(a / b, 4) if a is not None and b else None
        for fig in TIMES:
            ok = figures.get(v, {}).get(fig) is not None and base.get(fig) is not None
            other = figures.get(v, {})
            process = base.get(fig + "_process")
            out[f"{prefix}_{fig}_ratio_ci"] = ratio_interval(
                base.get(fig + "_all", []), other.get(fig + "_all", []),
                process=process) if ok else None
            if process is not None:  # --processes: each process's own ratio
                out[f"{prefix}_{fig}_ratio_by_process"] = _by_process(
                    base[fig + "_all"], other[fig + "_all"], process) if ok else None
    return out


def _blocks(process: list) -> list:
    """The round indices of each process, in the order the processes first appear."""
    blocks = {}
    for i, p in enumerate(process):
        blocks.setdefault(p, []).append(i)
    return list(blocks.values())


def _by_process(base: list, other: list, process: list) -> list:
    """``median(other) / median(base)`` within each process, in process order."""
    return [round(statistics.median(other[i] for i in b) / statistics.median(base[i] for i in b), 4)
            for b in _blocks(process)]


def print_table(figures: dict, rat: dict) -> None:
    cols = [("train_time", "train s/step", 3), ("train_cpu", "train CPU s", 3),
            ("infer_time", "infer s/batch", 3), ("infer_cpu", "infer CPU s", 3),
            ("peak_mem", "peak MB", 0), ("compile_time", "compile s", 1),
            ("compiled_step", "compiled s/step", 3)]
    head = f"{'model':<24}" + "".join(f"{title:>18}" for _, title, _ in cols)
    print(head)
    print("-" * len(head))
    for v, figs in figures.items():
        cells = []
        for fig, _, digits in cols:
            val = figs.get(fig)
            if val is None:
                cells.append(f"{'null':>18}")
                continue
            prefix = RATIO_PREFIX.get(v)
            r = rat.get(f"{prefix}_{fig}_ratio") if prefix else 1.0
            rtxt = f" ({r:.3f}x)" if r is not None else ""
            cells.append(f"{val:.{digits}f}{rtxt}".rjust(18))
        print(f"{v:<24}" + "".join(cells))
    intervals = [f"{prefix} {fig.replace('_', ' ')} {ci[0]:.3f}-{ci[1]:.3f}x"
                 for prefix in RATIO_PREFIX.values() for fig in TIMES
                 if (ci := rat.get(f"{prefix}_{fig}_ratio_ci"))]
    per = [f"{prefix} {fig.replace('_', ' ')} " + ", ".join(f"{r:.3f}x" for r in rs)
           for prefix in RATIO_PREFIX.values() for fig in TIMES
           if (rs := rat.get(f"{prefix}_{fig}_ratio_by_process"))]
    if intervals:
        over = "processes, then rounds" if per else "rounds"
        print(f"95% intervals of the ratios (paired bootstrap over {over}): "
              + "; ".join(intervals))
    if per:
        print("ratio in each process: " + "; ".join(per))


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(run_same_process(spec) if "variants" in spec else run_worker(spec)))
        return
    if args.device == "cpu" and (args.amp != "none" or args.channels_last):
        print("note: AMP/channels_last on CPU are measured but are not the GPU rows",
              file=sys.stderr)
    figures = collect_same_process(args) if args.same_process else collect(args)
    rat = ratios(figures)
    procs = (f"{args.processes} processes per measurement, medians of "
             f"{args.processes} x {args.repeats * args.steps}" if args.processes > 1 else
             f"one process per measurement, medians of {args.repeats * args.steps}")
    how = (f"{procs} rounds (one step per model each)" if args.same_process else
           f"medians of {args.repeats} interleaved repeats x {args.steps} steps")
    print(f"batch {args.batch}, {args.img} px, {args.device}, {args.threads} threads, "
          f"amp={args.amp}, channels_last={args.channels_last}"
          f"{', CUDA graph replays' if args.cuda_graph else ''}"
          f"{', freed memory kept' if args.keep_freed_memory else ''}"
          f"{f', compile mode {args.compile_mode}' if args.compile_mode else ''}, {how}; "
          "ratios to resnet50 in parentheses")
    print_table(figures, rat)
    config = {k: getattr(args, k) for k in ("repeats", "steps", *WORKER_OPTIONS, "measure",
                                            "cap", "same_process", "processes")}
    print(json.dumps({"config": config, "results": figures, **rat}))


if __name__ == "__main__":
    main()
