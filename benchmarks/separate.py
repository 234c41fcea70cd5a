"""End-to-end separation of one file: stemsep vs audio-separator 0.47.1. Not a test.

Same run, same input WAV, same checkpoint and yaml (random weights, seed 0), same overlap,
same `torch.set_num_threads`. Each tool runs in its own fresh Python process per repetition,
as a user's command would: the worker imports the tool, loads the model (timed apart), then
separates the file into WAV stems (timed: decode, network, overlap-add, encode), and reports
its own peak RSS (VmHWM from /proc/self/status, read inside the worker after the work)
and on CUDA `torch.cuda.max_memory_allocated`. No warm-up: each process separates once,
except in audio-separator's fast modes (below).

audio-separator runs in two modes, and stemsep's time is compared with each:
- `default`: its defaults (fp32, eager), timed on its first separation, as stemsep is.
- `fastest`: the best it offers, as a user separating several files in one process gets it:
  timed on its second separation, the first (the input's first chunk, counted in its load
  time) having compiled what it compiles and warmed up the rest (its first call costs more
  than later ones, compiled or not), as stemsep's `--compile` waits for its compile before
  the timed call. Of the modes tried (`FASTEST_CANDIDATES`), the fastest whose vocals stay
  within `CORRECT_SDR_DB` of its default ones. On the CPU: `warm` (its defaults) and
  `compiled` (its regional `torch.compile`, `Separator(use_torch_compile=True)`: each
  transformer block compiled, as stemsep's `compile=True` does), both fp32, as stemsep on
  the CPU: its CPU autocast would be bf16, and its fp16 path is GPU-only (its
  `execution_policy.py`). On a GPU: its regional compile with each of its half-precision
  paths, `use_native_fp16` (the model converted to fp16) and `use_autocast` (fp16 autocast).

- the input: stereo 44.1 kHz 16-bit, band-limited music-like content (harmonic chords, a
  vibrato "voice", band-pass-noise drums; deterministic), peak 0.5 so audio-separator's
  0.9 peak normalization leaves it unchanged.
- `--config-preset cpu`: the real 1297 STFT, band layout and 8-s chunks with a reduced
  network (dim 128, depth 2, heads 8, dim_head 16); `depth1`: 1297's layer sizes at depth 1
  (of 12); `full`: the 1297 config (for a GPU).
- audio-separator gets `mdxc_params` pinning its chunk to the config's (segment_size =
  chunk / hop + 1 = 801), else it picks a longer chunk for short files.
- apples to apples: the SDR between the two tools' vocals is computed and reported, and
  between audio-separator's fastest and default vocals.
- labels: each row records the device, torch's version and build (and CUDA version), the
  machine's `uptime` before and after, and each tool's precision, batch size and whether it
  ran compiled, as the worker found them.

Results merge, keyed by duration, into `benchmarks/results/separate_<device>_<preset>.json`
and `.md`; the ratios are printed last. Inputs, weights and stems go to `benchmarks/work/`.

    .venv/bin/python benchmarks/separate.py --durations 30 --reps 3 --overlap 2
    .venv/bin/python benchmarks/separate.py --durations 300,600 --reps 1 --overlap 2
    .venv/bin/python benchmarks/separate.py --device cuda --config-preset full --durations 30,300 --reps 3 --overlap 4
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / "work" / "separate"
RESULTS = ROOT / "benchmarks" / "results"
SAMPLE_RATE = 44100
AS = "audio-separator"
# audio-separator's modes: the `Separator` options each sets (none: its defaults).
AS_MODES = {
    "default": {},  # the only mode timed on its first separation
    "warm": {},
    "compiled": {"use_torch_compile": True},
    "compiled fp16": {"use_torch_compile": True, "use_native_fp16": True},
    "compiled autocast": {"use_torch_compile": True, "use_autocast": True},
}
# What its fastest may be, per device (see the module doc); on a GPU the fastest correct one.
FASTEST_CANDIDATES = {"cpu": ("warm", "compiled"), "cuda": ("compiled fp16", "compiled autocast")}
# A mode is correct if its vocals are at least this close to its fp32 default's (SDR): the two
# tools' fp32 vocals, with their different windows, are 40-46 dB apart (results/separate_*.md);
# an overflow to inf or NaN, or a miscompilation, gives 0 dB or less.
CORRECT_SDR_DB = 30.0

# Network sizes; the STFT, band layout and 8-s chunk are the 1297 config's in both, or Kim's
# MelBand-RoFormer's (60 mel bands) for the presets named in MEL_BAND.
PRESETS = {
    "cpu": {"dim": 128, "depth": 2, "heads": 8, "dim_head": 16},  # the network audio-separator was first measured with here
    "depth1": {"depth": 1},  # 1297's layers at full width, one of its twelve: minutes on a CPU
    "full": {},
    "melband-cpu": {"dim": 128, "depth": 2, "heads": 8, "dim_head": 16},  # Kim's bands and STFT, the "cpu" network size
}
MEL_BAND = {"melband-cpu"}


def base_config(preset: str) -> dict:
    from stemsep.testing import CONFIG_1297, CONFIG_KIM_MEL_BAND

    return CONFIG_KIM_MEL_BAND if preset in MEL_BAND else CONFIG_1297

# ---------------------------------------------------------------------------------------
# the input: deterministic band-limited music


def _midi_hz(note: np.ndarray | float) -> np.ndarray | float:
    return 440.0 * 2 ** ((np.asarray(note) - 69) / 12)


def _envelope(n: int, rng: np.random.Generator, sample_rate: int) -> np.ndarray:
    """Attack, exponential decay, release to exactly zero at the end (no steps, no clicks)."""
    t = np.arange(n) / sample_rate
    env = np.exp(-t * rng.uniform(1.5, 6.0))
    edge = int(0.005 * sample_rate)
    ramp = np.sin(np.linspace(0, np.pi / 2, edge)) ** 2
    env[:edge] *= ramp
    env[n - edge :] *= ramp[::-1]
    return env


def _beat(rng: np.random.Generator, index: int, n: int, sample_rate: int) -> np.ndarray:
    """One beat (stereo, n frames) that starts and ends at zero."""
    from scipy.signal import butter, sosfilt

    t = np.arange(n) / sample_rate
    top = 0.4 * sample_rate  # every partial well below Nyquist
    out = np.zeros((2, n))
    root = 45 + rng.choice([0, 3, 5, 7, 10])
    for note in root + np.array([0, 4, 7]) + rng.choice([0, 12], 3):  # a chord, harmonics 1/k
        f0, pan = _midi_hz(note), rng.uniform(0.2, 0.8)
        tone = sum(np.sin(2 * np.pi * k * f0 * t + rng.uniform(0, 2 * np.pi)) / k for k in range(1, 6) if k * f0 < top)
        tone = 0.3 * tone * _envelope(n, rng, sample_rate)
        out += np.array([[1 - pan], [pan]]) * tone
    f0 = _midi_hz(60 + rng.choice([0, 2, 4, 5, 7, 9, 11, 12]))  # a "voice": vibrato, formant-ish harmonics
    phase = 2 * np.pi * np.cumsum(f0 * (1 + 0.02 * np.sin(2 * np.pi * 5.5 * t))) / sample_rate
    voice = sum(np.sin(k * phase) * np.exp(-((k * f0 - 700) / 900) ** 2) for k in range(1, 20) if k * f0 < top)
    out += 0.4 * voice * _envelope(n, rng, sample_rate)
    noise = rng.standard_normal((2, n))
    kick = sosfilt(butter(2, [50, 160], "bandpass", fs=sample_rate, output="sos"), noise) * (index % 2 == 0)
    hat = sosfilt(butter(2, [5000, 12000], "bandpass", fs=sample_rate, output="sos"), noise)
    out += 3.0 * kick * np.exp(-t * 25) + 0.4 * hat * np.exp(-t * 60)
    edge = int(0.005 * sample_rate)
    ramp = np.sin(np.linspace(0, np.pi / 2, edge)) ** 2
    out[:, :edge] *= ramp
    out[:, n - edge :] *= ramp[::-1]
    return out


def write_music(path: Path, seconds: float, seed: int = 0, peak: float = 0.5, sample_rate: int = SAMPLE_RATE) -> Path:
    """`seconds` of music-like stereo at 120 bpm, 16-bit WAV, written beat by beat (long
    files never sit in memory whole); each beat is scaled to peak at most `peak`."""
    rng = np.random.default_rng(seed)
    beat = sample_rate // 2
    total = round(seconds * sample_rate)
    tmp = path.with_name(path.name + ".part")
    with sf.SoundFile(tmp, "w", sample_rate, 2, "PCM_16", format="WAV") as f:
        for index in range(math.ceil(total / beat)):
            n = min(beat, total - index * beat)
            x = _beat(rng, index, n, sample_rate) if n > int(0.02 * sample_rate) else np.zeros((2, n))
            x *= peak / max(np.abs(x).max(), peak)
            f.write(x.T.astype(np.float32))
    tmp.rename(path)
    return path


def input_file(seconds: float, seed: int) -> Path:
    path = WORK / f"music_{seconds:g}s_seed{seed}.wav"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_music(path, seconds, seed)
    return path


# ---------------------------------------------------------------------------------------
# the model files both tools load


def model_files(preset: str) -> tuple[Path, Path]:
    """Random weights (seed 0) under the 1297 names, rewritten each run (deterministic)."""
    from stemsep.reference import (
        CHECKPOINT_NAME,  # the file name audio-separator looks for
    )
    from stemsep.testing import config_dict, make_model_files

    base = base_config(preset)
    chunk, hop = base["audio"]["chunk_size"], base["model"]["stft_hop_length"]
    config = config_dict(model=PRESETS[preset], inference={"dim_t": chunk // hop + 1}, base=base)
    return make_model_files(WORK / f"model_{preset}", config, seed=0, name=CHECKPOINT_NAME.removesuffix(".ckpt"))


def worker_files(checkpoint: Path, config: Path, model_dir: Path) -> dict[str, str]:
    """What a worker loads (its hidden flags): the same files for both tools (audio-separator's
    `model_dir` holds symlinks to them), its chunk pinned to the config's."""
    from stemsep.checkpoint import load_config
    from stemsep.reference import audio_separator_model_dir

    loaded = load_config(config)
    chunk = loaded.audio.chunk_size
    return {"checkpoint": str(checkpoint), "config": str(config),
            "model_dir": str(audio_separator_model_dir(checkpoint, config, model_dir)),
            "segment_size": str(chunk // loaded.model.stft_hop_length + 1),  # its chunk = hop x (segment_size - 1)
            "chunk_size": str(chunk)}


# ---------------------------------------------------------------------------------------
# the worker: one tool, one separation, in a fresh process


def _memory_mb(field: str) -> float:
    """This process's VmRSS (now) or VmHWM (peak) from /proc/self/status. Not getrusage's
    ru_maxrss: a spawned child's ru_maxrss starts at its parent's peak (Linux carries the
    high-water mark across exec), so it would report this script's own memory as the tool's."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _cpu_s() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def audio_separator_precision(separator, device: str) -> str:
    """The precision audio-separator's loaded model runs in (its `effective_precision`)."""
    import torch

    precision = separator.effective_precision  # "fp32", "native_fp16" or "autocast"
    if precision == "autocast":
        return {torch.float16: "fp16", torch.bfloat16: "bf16"}[torch.get_autocast_dtype(device)] + " autocast"
    return {"native_fp16": "fp16"}.get(precision, precision)


def warm_up(separator, source: str, frames: int, out_dir: Path) -> float:
    """Separate `source`'s first `frames` (one chunk) and delete the stems: audio-separator
    compiles at its first chunk, and its first call costs more. Returns the seconds it took."""
    import tempfile
    import time

    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        excerpt = Path(folder) / "warm_up.wav"
        audio, rate = sf.read(source, frames=frames, dtype="int16", always_2d=True)
        sf.write(excerpt, audio, rate, subtype="PCM_16")
        for stem in separator.separate(str(excerpt)):
            (out_dir / Path(stem).name).unlink()
    return time.perf_counter() - t


def worker(args: argparse.Namespace) -> None:
    import time

    t0 = time.perf_counter()
    import torch

    torch.set_num_threads(args.threads)
    if args.worker == "stemsep":
        from stemsep.separator import Separator
    else:
        import logging

        from audio_separator.separator import (
            Separator as AudioSeparator,  # nothing of stemsep in its process
        )
    t1 = time.perf_counter()

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict = {}
    if args.worker == "stemsep":
        options = {"precision": args.precision} if args.precision else {}  # default: its own ("auto")
        if args.batch_size:
            options["batch_size"] = args.batch_size
        separator = Separator(args.checkpoint, args.config, device=args.device, compile=args.compile, **options)
        if args.compile and not separator.wait_for_compile():  # steady state: timed once the compiled network is in use
            raise SystemExit(f"compiling failed ({separator.compilation.state})")
    else:
        options = AS_MODES[args.mode]
        separator = AudioSeparator(
            log_level=logging.WARNING, model_file_dir=args.model_dir, output_dir=str(out_dir), output_format="WAV",
            use_soundfile=args.audio_separator_writer == "soundfile", **options,
            mdxc_params={"overlap": args.overlap, "batch_size": 1, "pitch_shift": 0,  # its chunk = hop x (segment_size - 1)
                         "segment_size": int(args.segment_size), "override_model_segment_size": True},
        )
        separator.load_model(model_filename=Path(args.checkpoint).name)
        if args.mode != "default":
            result["warm_up_s"] = warm_up(separator, args.input, int(args.chunk_size), out_dir)
    if args.device == "cuda":
        torch.cuda.synchronize()
    t2 = time.perf_counter()
    rss_after_load = _memory_mb("VmHWM"), _memory_mb("VmRSS")
    cpu_before = _cpu_s()

    if args.worker == "stemsep":
        vocals = separator.separate(args.input, out_dir, overlap=args.overlap)["vocals"]
    else:
        outputs = separator.separate(args.input)
        vocals = out_dir / next(Path(o).name for o in outputs if "(vocals)" in o.lower())
    if args.device == "cuda":
        torch.cuda.synchronize()
    t3 = time.perf_counter()

    result.update({
        "import_s": t1 - t0,
        "load_s": t2 - t1,
        "separate_s": t3 - t2,
        "separate_cpu_s": _cpu_s() - cpu_before,  # user + system, all threads (busy-waiting included)
        "peak_rss_mb": _memory_mb("VmHWM"),
        "peak_rss_after_load_mb": rss_after_load[0],
        "rss_after_load_mb": rss_after_load[1],
        "threads": torch.get_num_threads(),
        "vocals": str(vocals),
    })
    if args.worker == "stemsep":  # what its defaults chose
        result.update(precision=getattr(separator, "precision", "fp32"), batch_size=separator.batch_size,
                      compile=separator.compiled)
    else:  # what it ran, after the separation (a compile that fails at a chunk falls back to eager)
        result.update(mode=args.mode, precision=audio_separator_precision(separator, args.device), batch_size=1,
                      compile=separator.effective_torch_compile)  # it ignores batch_size for Roformers
        if result["compile"] != bool(options.get("use_torch_compile")):
            raise SystemExit(f"audio-separator's {args.mode} mode ran {'compiled' if result['compile'] else 'eagerly'}")
    if args.device == "cuda":
        result["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(result))


def busy_cores(seconds: float = 5.0) -> float:
    """How many cores the machine's processes kept busy over the last `seconds` (/proc/stat)."""
    import time

    busy0, total0 = cpu_ticks()
    time.sleep(seconds)
    busy1, total1 = cpu_ticks()
    return (os.cpu_count() or 1) * (busy1 - busy0) / max(1, total1 - total0)


def cpu_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of all cores since boot, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def wait_for_idle(max_busy: float, patience_s: float = 3600) -> float:
    """On a shared machine: wait (up to `patience_s`) until others keep fewer than `max_busy` cores busy."""
    import time

    deadline = time.monotonic() + patience_s
    while (busy := busy_cores()) >= max_busy and time.monotonic() < deadline:
        print(f"  waiting: other processes keep {busy:.1f} cores busy", flush=True)
        time.sleep(25)
    return busy


def run_worker(run: str, input_path: Path, model: dict[str, str], out_dir: Path, args, timeout: float | None = None) -> dict:
    """One worker in a fresh process: `run` is "stemsep" (with `args`' stemsep options) or an
    audio-separator mode (`run_name`); `model` is `worker_files`'."""
    import resource
    import time

    shutil.rmtree(out_dir, ignore_errors=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # audio-separator picks CUDA by itself when it sees one
    tool = "stemsep" if run == "stemsep" else AS
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", tool, "--input", str(input_path),
               *[part for key, value in model.items() for part in (f"--{key.replace('_', '-')}", value)], "--out-dir", str(out_dir),
               "--overlap", str(args.overlap), "--threads", str(args.threads), "--device", args.device,
               "--audio-separator-writer", args.audio_separator_writer]
    if tool == AS:
        command += ["--mode", run.removeprefix(AS).strip() or "default"]
    else:
        command += [*(["--precision", args.precision] if args.precision else []),
                    *(["--batch-size", str(args.batch_size)] if args.batch_size else []), *(["--compile"] if args.compile else [])]
    busy_before = wait_for_idle(args.wait_idle) if args.wait_idle else busy_cores(1.0)
    # Others' CPU use while the worker runs = all cores' busy time minus the worker's own.
    ticks0, children0, t0 = cpu_ticks()[0], resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)
    ticks1, children1, wall = cpu_ticks()[0], resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter() - t0
    if done.returncode:
        raise RuntimeError(f"{run} worker failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    worker_cpu_s = sum(getattr(children1, f) - getattr(children0, f) for f in ("ru_utime", "ru_stime"))
    others = ((ticks1 - ticks0) / os.sysconf("SC_CLK_TCK") - worker_cpu_s) / wall
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "process_wall_s": wall, "busy_cores_before": busy_before,
            "worker_cpu_cores": worker_cpu_s / wall, "others_busy_cores_during": max(0.0, others)}


def run_name(mode: str) -> str:
    """An audio-separator mode's name as a run: "audio-separator" (its defaults), "audio-separator compiled", ..."""
    return AS if mode == "default" else f"{AS} {mode}"


# ---------------------------------------------------------------------------------------
# comparing and reporting


def sdr_db(reference: Path, estimate: Path) -> float:
    """The SNR of the file `estimate` against `reference` over the whole file (audio-separator's
    vocals as the reference), 10 log10(sum s^2 / sum (s - s_hat)^2); inf if identical."""
    from stemsep.compilation import snr_db

    s, _ = sf.read(reference, dtype="float32", always_2d=True)
    e, _ = sf.read(estimate, dtype="float32", always_2d=True)
    if s.shape != e.shape:
        raise RuntimeError(f"vocals differ in shape: {reference.parent.name} {s.shape}, {estimate.parent.name} {e.shape}")
    return snr_db(s, e)


def compare_vocals(runs: dict[str, list[dict]]) -> dict[str, float]:
    """The SDR of each run's (first repetition's) vocals against audio-separator's default ones."""
    reference = Path(runs[AS][0]["vocals"])
    return {run: sdr_db(reference, Path(reps[0]["vocals"])) for run, reps in runs.items() if run != AS}


def uptime() -> str:
    """`uptime`'s line (load averages over 1, 5 and 15 minutes)."""
    done = subprocess.run(["uptime"], capture_output=True, text=True, check=False)
    return done.stdout.strip() or "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def machine(device: str) -> dict:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or platform.machine())
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()  # noqa: E731
    described = {
        "device": device,
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        "uptime_before": uptime(),
        "python": platform.python_version(),
        "torch": torch.__version__,  # with its build: +cpu, +cu130, ...
        "torch_cuda": torch.version.cuda,
        "audio_separator": _version("audio-separator"),
        "stemsep_commit": git("rev-parse", "--short", "HEAD"),
        "stemsep_src_modified": bool(git("status", "--porcelain", "src/stemsep")),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if device == "cuda":
        described["gpu"] = torch.cuda.get_device_name()
    return described


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def audio_separator_chunk_count(length: int, chunk: int, step: int) -> int:
    """Chunks audio-separator 0.47.1 runs (`MDXCSeparator._roformer_chunk_starts`): one every
    `step` samples while a chunk fits, then one last chunk flush with the end."""
    starts: list[int] = []
    for offset in range(0, length, step):
        if offset + chunk >= length:
            if not starts or starts[-1] != max(length - chunk, 0):
                starts.append(max(length - chunk, 0))
            break
        starts.append(offset)
    return len(starts)


def network_work(seconds: float, overlap: int, config_path: Path) -> dict:
    """Each tool's chunk count for this input and the FLOPs of one chunk (stemsep.flops)."""
    from flops import flops_per_chunk

    from stemsep.checkpoint import load_config
    from stemsep.chunking import plan_chunks

    config = load_config(config_path)
    length, chunk = round(seconds * SAMPLE_RATE), config.audio.chunk_size
    return {"flops_per_chunk": flops_per_chunk(config),
            "chunks": {"stemsep": plan_chunks(length, chunk, overlap).count,
                       "audio-separator": audio_separator_chunk_count(length, chunk, chunk // overlap)}}


def tool_summary(seconds: float, runs: list[dict], device: str) -> dict:
    """One tool's (or audio-separator mode's) repetitions: median times, largest memory, and
    what it ran (precision, batch size, compiled or not, as its worker found them)."""
    median = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
    summary = {
        "separate_s": median("separate_s"),
        "real_time_factor": seconds / median("separate_s"),
        "separate_s_min": min(r["separate_s"] for r in runs),  # the least disturbed, on a shared machine
        "separate_cpu_s": statistics.median(r.get("separate_cpu_s", math.nan) for r in runs),
        "load_s": median("load_s"),
        "import_s": median("import_s"),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        "peak_rss_after_load_mb": max(r["peak_rss_after_load_mb"] for r in runs),
        **{key: runs[0][key] for key in ("mode", "precision", "batch_size", "compile") if key in runs[0]},
        "runs": [{k: v for k, v in r.items() if k != "vocals"} for r in runs],
    }
    if "warm_up_s" in runs[0]:
        summary["warm_up_s"] = median("warm_up_s")  # in load_s
    if device == "cuda":
        summary["cuda_peak_allocated_mb"] = max(r["cuda_peak_allocated_mb"] for r in runs)
    return summary


def summarize(seconds: float, runs: dict[str, list[dict]], sdrs: dict[str, float], args, machine_info: dict,
              work: dict) -> dict:
    """A results row: stemsep, audio-separator's default and its fastest correct mode (of those
    in `runs`), the time ratios against each; `sdrs` is `compare_vocals`'."""
    from flops import datasheet_peak_tflops

    entry: dict = {"audio_seconds": seconds, "overlap": args.overlap, "reps": args.reps, "threads": args.threads,
                   "machine": machine_info, "flops_per_chunk": work["flops_per_chunk"],
                   "audio_separator_writer": args.audio_separator_writer}
    entry["stemsep"] = tool_summary(seconds, runs["stemsep"], args.device)
    entry[AS] = tool_summary(seconds, runs[AS], args.device)
    tried = entry["audio_separator_modes_tried"] = {}
    for run in runs:
        if run.startswith(f"{AS} "):
            summary = tool_summary(seconds, runs[run], args.device)
            summary["vocals_sdr_vs_default_db"] = None if math.isinf(sdrs[run]) else sdrs[run]  # None: identical
            summary["correct"] = sdrs[run] >= CORRECT_SDR_DB
            tried[summary["mode"]] = summary
    correct = [mode for mode, t in tried.items() if t["correct"]]
    entry["audio_separator_fastest"] = min(correct, key=lambda mode: tried[mode]["separate_s"]) if correct else None
    for key, t in (("stemsep", entry["stemsep"]), (AS, entry[AS]), *((AS, t) for t in tried.values())):
        t["chunks"] = work["chunks"][key]  # model FLOP utilization: useful network work over the whole call
        t["network_tflops"] = t["chunks"] * work["flops_per_chunk"] / t["separate_s"] / 1e12
        if args.device == "cuda":
            t["datasheet_peak_tflops"] = datasheet_peak_tflops(machine_info["gpu"], t["precision"])
            t["mfu"] = t["network_tflops"] / t["datasheet_peak_tflops"] if t["datasheet_peak_tflops"] else None
    ours, theirs, fastest = entry["stemsep"], entry[AS], fastest_of(entry)
    entry["time_ratio_audio_separator_over_stemsep"] = theirs["separate_s"] / ours["separate_s"]
    entry["time_ratio_audio_separator_fastest_over_stemsep"] = fastest["separate_s"] / ours["separate_s"] if fastest else None
    entry["peak_rss_ratio_stemsep_over_audio_separator"] = ours["peak_rss_mb"] / theirs["peak_rss_mb"]
    entry["vocals_sdr_between_tools_db"] = sdrs["stemsep"]
    every = [r for reps in runs.values() for r in reps]
    entry["others_busy_cores_before_workers_max"] = max(r["busy_cores_before"] for r in every)
    entry["others_busy_cores_during_workers_max"] = max(r["others_busy_cores_during"] for r in every)
    return entry


def fastest_of(entry: dict) -> dict | None:
    """audio-separator's fastest correct mode in a results row (None: none, or a row from before)."""
    mode = entry.get("audio_separator_fastest")
    return entry["audio_separator_modes_tried"][mode] if mode else None


def label(entry: dict) -> str:
    """A row's name: the input length, then what differs from the defaults."""
    threads = "" if entry["threads"] == entry["machine"]["cores"] else f", {entry['threads']} threads"
    return f"{entry['audio_seconds']:g} s{threads}{', stemsep compiled' if entry['stemsep'].get('compile') else ''}"


def how(tool: dict) -> str:
    """What a tool ran: "fp32, batch 1, eager" (rows from before the labels say less)."""
    return ", ".join(filter(None, [tool.get("precision"), f"batch {tool.get('batch_size')}",
                                   "compiled (regional)" if tool.get("compile") else "eager" if "compile" in tool else None]))


def fmt(value, spec: str = ".2f", unit: str = "") -> str:
    """`value` formatted, or "-" where there is none (None or NaN)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:{spec}}{unit}"


def audio_separator_modes(entry: dict) -> str:
    """What audio-separator ran in a results row: its default and fastest modes, and each mode tried."""
    if "audio_separator_modes_tried" not in entry:  # a row from before its modes
        return "audio-separator fp32, batch 1, eager"
    tried = [f"{mode} {t['separate_s']:.1f} s, vocals "
             + ("identical to" if t["vocals_sdr_vs_default_db"] is None else f"{t['vocals_sdr_vs_default_db']:.1f} dB SDR from")
             + f" its default ones{'' if t['correct'] else ' (not correct)'}" for mode, t in entry["audio_separator_modes_tried"].items()]
    fastest = fastest_of(entry)
    chosen = (f"`{fastest['mode']}`: {how(fastest)} (its first separation, one chunk, took {fmt(fastest.get('warm_up_s'), '.1f', ' s')}, "
              "in its load)") if fastest else "none correct"
    return f"audio-separator default: {how(entry[AS])}; fastest {chosen}; modes tried: {'; '.join(tried) or 'none'}"


def markdown(results: dict) -> str:
    keys = sorted(results["runs"], key=lambda k: (results["runs"][k]["audio_seconds"], results["runs"][k]["threads"], k))
    lines = [
        f"# End-to-end separation: stemsep vs audio-separator ({results['device']}, preset `{results['preset']}`)",
        "",
        f"Network: {results['network']}. Random weights, same checkpoint and yaml for both tools; each tool "
        "in its own fresh process per repetition; time = the separation call (decode, network, overlap-add, "
        "WAV encode), median over reps; peak RSS = the worker's VmHWM (max over reps). "
        "RTF = audio seconds / wall seconds. audio-separator runs at its defaults (its first separation) and at "
        "its fastest: the fastest of the modes tried whose vocals stay within "
        f"{CORRECT_SDR_DB:g} dB SDR of its default ones, each timed on its second separation in the process "
        "(the first, one chunk, compiles and warms up; in its load time): on the CPU its defaults (`warm`) and "
        "its regional torch.compile (`compiled`), fp32; on a GPU its regional torch.compile with its native fp16 "
        "and with its fp16 autocast. Written by `benchmarks/separate.py`.",
        "",
        "| audio | overlap | reps | stemsep time | audio-separator time, default | audio-separator time, fastest "
        "| time ratio (a-s default / stemsep) | time ratio (a-s fastest / stemsep) | stemsep RTF | stemsep peak RSS "
        "| audio-separator peak RSS (default / fastest) | RSS ratio (stemsep / a-s default) "
        "| load (stemsep / a-s default / a-s fastest) | vocals SDR between tools |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key in keys:
        e = results["runs"][key]
        ours, theirs, fastest = e["stemsep"], e[AS], fastest_of(e)
        time = lambda t: f"{t['separate_s']:.1f} s" + (f" (min {t['separate_s_min']:.1f})" if e["reps"] > 1 and "separate_s_min" in t else "")  # noqa: E731
        faster = fastest or {}  # rows from before audio-separator's fastest mode have none
        lines.append(
            f"| {label(e)} | {e['overlap']} | {e['reps']} | {time(ours)} | {time(theirs)} | {time(fastest) if fastest else '-'} "
            f"| {e['time_ratio_audio_separator_over_stemsep']:.2f}x "
            f"| {fmt(e.get('time_ratio_audio_separator_fastest_over_stemsep'), '.2f', 'x')} "
            f"| {ours['real_time_factor']:.2f}x | {ours['peak_rss_mb']:.0f} MB "
            f"| {theirs['peak_rss_mb']:.0f} / {fmt(faster.get('peak_rss_mb'), '.0f')} MB "
            f"| {e['peak_rss_ratio_stemsep_over_audio_separator']:.2f} "
            f"| {ours['load_s']:.2f} s / {theirs['load_s']:.2f} s / {fmt(faster.get('load_s'), '.2f', ' s')} "
            f"| {e['vocals_sdr_between_tools_db']:.1f} dB |"
        )
    if results["device"] == "cuda":
        lines += ["", "Network work over the whole separation call (chunks x FLOPs per chunk / time); MFU against the "
                  "datasheet dense peak of the precision each tool runs in.", "",
                  "| audio | chunks (stemsep / a-s) | stemsep TFLOP/s | stemsep MFU | a-s default TFLOP/s | a-s default MFU "
                  "| a-s fastest TFLOP/s | a-s fastest MFU | stemsep CUDA peak allocated | a-s CUDA peak allocated (default / fastest) |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for key in keys:
            e = results["runs"][key]
            ours, theirs, fastest = e["stemsep"], e[AS], fastest_of(e) or {}
            pct = lambda t: f"{100 * t['mfu']:.0f}%" if t.get("mfu") else "-"  # noqa: E731
            lines.append(f"| {label(e)} | {ours.get('chunks')} / {theirs.get('chunks')} | {fmt(ours.get('network_tflops'), '.0f')} "
                         f"| {pct(ours)} | {fmt(theirs.get('network_tflops'), '.1f')} | {pct(theirs)} "
                         f"| {fmt(fastest.get('network_tflops'), '.1f')} | {pct(fastest)} "
                         f"| {ours['cuda_peak_allocated_mb']:.0f} MB | {theirs['cuda_peak_allocated_mb']:.0f} / "
                         f"{fmt(fastest.get('cuda_peak_allocated_mb'), '.0f')} MB |")
    lines += ["", "What each tool ran, and the machine (per row):", ""]
    for key in keys:
        e = results["runs"][key]
        m = e["machine"]
        gpu = f", {m['gpu']}" if "gpu" in m else ""
        cuda = f" (CUDA {m['torch_cuda']})" if m.get("torch_cuda") else ""
        uptimes = f", uptime before: `{m['uptime_before']}`, after: `{m['uptime_after']}`" if "uptime_after" in m else ""
        lines.append(f"- {label(e)}, {e['threads']} threads: stemsep {how(e['stemsep'])}; {audio_separator_modes(e)} "
                     f"({e.get('audio_separator_writer', 'pydub')} writer); device {m.get('device', results['device'])}, "
                     f"torch {m['torch']}{cuda}; {m['cpu']}, {m['cores']} cores{gpu}, "
                     f"{e['threads']} torch threads, load average at start {m['load_average_at_start'][0]:.2f}{uptimes}, "
                     f"other processes busy before a worker <= {e['others_busy_cores_before_workers_max']:.1f} cores, during a worker "
                     f"<= {e['others_busy_cores_during_workers_max']:.1f} cores (mean over its run), Python {m['python']}, "
                     f"audio-separator {m['audio_separator']}, stemsep {m['stemsep_commit']}"
                     f"{' (src modified)' if m['stemsep_src_modified'] else ''}, {m['date']}")
    return "\n".join(lines) + "\n"


def row_key(seconds: float, args: argparse.Namespace) -> str:
    """One results row per input length (and thread count, when not all cores; and stemsep's
    options, when not its defaults)."""
    key = f"{seconds:g}" if args.threads == os.cpu_count() else f"{seconds:g}@{args.threads}threads"
    return key + (f"+batch{args.batch_size}" if args.batch_size else "") + ("+compile" if args.compile else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--durations", default="30", help="comma-separated input lengths in seconds")
    parser.add_argument("--reps", type=int, default=3, help="fresh processes per tool and mode (median reported)")
    parser.add_argument("--overlap", type=int, default=2)
    parser.add_argument("--config-preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads in both workers")
    parser.add_argument("--seed", type=int, default=0, help="of the generated input")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"],
                        help="stemsep's precision (default: its own, auto = bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--batch-size", type=int, help="stemsep's chunks per forward pass (default: its own)")
    parser.add_argument("--compile", action="store_true", help="stemsep with torch.compile (compiled in its load time: the separation waits for it)")
    parser.add_argument("--audio-separator-writer", choices=["pydub", "soundfile"], default="pydub",
                        help="audio-separator's WAV writer: its default pydub (calls ffmpeg) or its use_soundfile option")
    parser.add_argument("--wait-idle", type=float, metavar="CORES",
                        help="on a shared machine, start each worker only once other processes keep fewer than CORES cores busy")
    parser.add_argument("--worker", choices=["stemsep", AS], help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=sorted(AS_MODES), help=argparse.SUPPRESS)  # audio-separator's
    for hidden in ("--input", "--checkpoint", "--config", "--model-dir", "--segment-size", "--chunk-size", "--out-dir"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    checkpoint, config = model_files(args.config_preset)
    model = worker_files(checkpoint, config, WORK / f"audio_separator_models_{args.config_preset}")
    base = base_config(args.config_preset)
    network = {k: v for k, v in {**base["model"], **PRESETS[args.config_preset]}.items()
               if k in ("dim", "depth", "heads", "dim_head")}
    layout = "Kim's MelBand STFT and 60 mel bands" if args.config_preset in MEL_BAND else "1297 STFT and 62 bands"
    out_json = RESULTS / f"separate_{args.device}_{args.config_preset}.json"
    results = json.loads(out_json.read_text()) if out_json.exists() else {}
    results.update({"device": args.device, "preset": args.config_preset,
                    "network": ", ".join(f"{k} {v}" for k, v in network.items()) + f", {layout}, 8-s chunks"})
    results.setdefault("runs", {})
    plan = ["stemsep", AS, *(run_name(mode) for mode in FASTEST_CANDIDATES[args.device])]

    for seconds in (float(d) for d in args.durations.split(",")):
        machine_info = machine(args.device)
        source = input_file(seconds, args.seed)
        runs: dict[str, list[dict]] = {run: [] for run in plan}
        for rep in range(args.reps):
            for run in plan if rep % 2 == 0 else plan[::-1]:  # alternate who runs first
                result = run_worker(run, source, model, WORK / "out" / f"{run.replace(' ', '_')}_rep{rep}", args)
                runs[run].append(result)
                print(f"{seconds:g} s, rep {rep + 1}/{args.reps}, {run}: separate {result['separate_s']:.1f} s, "
                      f"load {result['load_s']:.2f} s, peak RSS {result['peak_rss_mb']:.0f} MB "
                      f"(others kept {result['busy_cores_before']:.1f} cores busy before, {result['others_busy_cores_during']:.1f} during)", flush=True)
        machine_info["uptime_after"] = uptime()
        sdrs = compare_vocals(runs)
        print(f"{seconds:g} s: vocals SDR against audio-separator's default ones: "
              + ", ".join(f"{run} {sdr:.1f} dB" for run, sdr in sdrs.items()), flush=True)
        shutil.rmtree(WORK / "out", ignore_errors=True)
        work = network_work(seconds, args.overlap, config)
        results["runs"][row_key(seconds, args)] = summarize(seconds, runs, sdrs, args, machine_info, work)

        RESULTS.mkdir(parents=True, exist_ok=True)  # written after every duration: a long run keeps what it has
        out_json.write_text(json.dumps(results, indent=2) + "\n")
        out_json.with_suffix(".md").write_text(markdown(results))

    print(f"results: {out_json.relative_to(ROOT)} and .md")
    for seconds in (float(d) for d in args.durations.split(",")):
        e = results["runs"][row_key(seconds, args)]
        ours, theirs, fastest = e["stemsep"], e[AS], fastest_of(e)
        print(f"{seconds:g} s, overlap {e['overlap']}: stemsep {ours['separate_s']:.1f} s ({ours['real_time_factor']:.2f}x real time), "
              f"audio-separator {theirs['separate_s']:.1f} s default, "
              + (f"{fastest['separate_s']:.1f} s fastest ({fastest['mode']}); " if fastest else "no correct fastest mode; ")
              + f"peak RSS stemsep {ours['peak_rss_mb']:.0f} MB, audio-separator {theirs['peak_rss_mb']:.0f} MB; "
              f"vocals SDR between tools {e['vocals_sdr_between_tools_db']:.1f} dB")
    for seconds in (float(d) for d in args.durations.split(",")):
        e = results["runs"][row_key(seconds, args)]
        print(f"{seconds:g} s: time audio-separator / stemsep = {e['time_ratio_audio_separator_over_stemsep']:.2f}x default, "
              f"{fmt(e['time_ratio_audio_separator_fastest_over_stemsep'], '.2f', 'x')} fastest; "
              f"peak RSS stemsep / audio-separator = {e['peak_rss_ratio_stemsep_over_audio_separator']:.2f}")


if __name__ == "__main__":
    main()
