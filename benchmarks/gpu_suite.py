"""The GPU numbers in one command: cold start, the 5-minute song, MFU, memory, bf16 SNR. Not a test.

    python benchmarks/gpu_suite.py                       # one GPU, about 6 minutes (budget 7.5)
    .venv/bin/python benchmarks/gpu_suite.py --smoke     # the CPU: tiny network, short audio, < 2 minutes

Everything runs on random weights of the 1297 shapes (seed 0, written under the 1297 file
names), the same files for every tool, and a generated music-like song (separate.py's
`write_music`). The stages, in this order, each skipped (and marked so) when the time
budget (`--budget-s`) could not hold it:

1. cold start of the Replicate runner: the real Cog server (tests/cogserver.py, coglet) on
   predict.py with the weights laid out as the image's /weights ($STEMSEP_WEIGHTS_DIR),
   compiling as the image does on a GPU: process start -> READY (setup() loads and warms up
   the eager network; the compiled one builds in the background), a sync prediction of a
   short song passed by URL sent at once (process start -> first result is the cold start a
   caller sees), then predictions one after another until one runs compiled (process start
   -> compiled network in use). TorchInductor's and Triton's caches start empty (a fresh
   folder per run), as in a new container. Later stages reuse them.
2. the 5-minute song end to end, overlap 4: audio-separator 0.47.1 at its defaults (fp32,
   eager, batch 1) and at its fastest (separate.py's modes: its regional torch.compile with
   its native fp16, and with its fp16 autocast; the faster of those whose vocals stay within
   separate.py's CORRECT_SDR_DB of its default ones), stemsep eager and stemsep compiled (the
   runner's defaults otherwise: bf16 autocast, its batch size), each in its own fresh
   process through separate.py's worker; wall time of the separation call, real-time factor,
   load time (audio-separator's compile included), peak RSS, CUDA peak allocated, chunks,
   network TFLOP/s and MFU over the whole call (flops.py's count, datasheet dense peak of
   the precision each tool runs in), stemsep's time ratio against audio-separator's default
   and its fastest, SDR of each run's vocals against audio-separator's default ones.
3. the network alone, in this process: seconds per chunk for stemsep in fp32 and bf16,
   eager and compiled, at the runner's batch size on the song's first chunks; TFLOP/s, MFU
   against the datasheet peak and against a bf16 matrix product measured here; peak GPU
   memory of each (compiled both regionally, as the runner does, and whole, each with its
   compile time); SNR of bf16 (eager and compiled) against fp32, for the network's output
   and for the vocals of the whole pipeline (stemsep fp32 vs bf16 on a 30-s excerpt).
4. the cold start without compiling (STEMSEP_COMPILE=0), for the compile's share.
5. two predictions in flight against one (benchmarks/concurrency.py): songs per hour and
   latency of sync predictions of the short song, and whether that clears the adoption
   rule (+20% songs per hour, median latency at most 10% worse).

Writes benchmarks/results/gpu_<device>.json and .md (<device> from the GPU's name, e.g.
`nvidia_h200`; `cpu_smoke` for --smoke). Scratch files go to benchmarks/work/gpu_suite/.

--smoke checks the suite itself on a CPU: the tiny network of the tests (dim 16, depth 1)
with the 1297 STFT and bands on 2-s chunks, an 8-s song, overlap 2, one torch thread per
process, and torch.compile switched off (TORCH_COMPILE_DISABLE=1: the "compiled" rows run
eagerly, because Inductor needs minutes for even this network on a small CPU); there
audio-separator's fastest is one of its CPU modes, warm or compiled. About a minute on 2 cores;
its numbers mean nothing.

Needs, besides a CUDA build of torch: stemsep's dependencies (numpy, einops, pyyaml, av,
soundfile, soxr), scipy (the song), cog and coglet 0.23.1 (the server), and
audio-separator 0.47.1 with its own (librosa, pydub, onnx2torch, onnxruntime, diffq, ...)
and the ffmpeg binary on PATH (audio-separator refuses to start without it). It checks
them first and stops, naming what is missing, before it touches the GPU. On a machine
that cannot reach a package index, carry them as wheels built for its Python.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
for _path in (ROOT / "tests", BENCH):  # cogserver (the tests' server helper); separate, model_forward, flops
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))
if importlib.util.find_spec("stemsep") is None:  # a checkout without `pip install -e .`: this process and its children
    sys.path.insert(0, str(ROOT / "src"))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
import fixtures  # noqa: E402  (benchmarks/fixtures.py, shared with concurrency.py)

WORK = fixtures.WORK
RESULTS = BENCH / "results"


PROFILES = {
    "full": SimpleNamespace(device="cuda", network={}, chunk_size=None, song_s=300.0, short_s=30.0, overlap=4, reps=3,
                            threads=os.cpu_count(), budget_s=450.0, concurrency_songs=8),
    # the tests' tiny network (stemsep.testing.TINY_MODEL) on 2-s chunks of the 1297 STFT and bands
    # and one CPU thread per process: on a shared machine, torch's threads waiting for each
    # other's cores make a tiny forward pass 50x slower
    "smoke": SimpleNamespace(device="cpu", network={"dim": 16, "depth": 1, "dim_head": 8, "heads": 2}, chunk_size=88200,
                             song_s=8.0, short_s=3.0, overlap=2, reps=1, threads=1, budget_s=110.0, concurrency_songs=2),
}
# Rough seconds each stage takes on an H100/H200 (compile included where cold), used to skip
# a stage that the remaining budget cannot hold rather than overrun the machine's lease.
STAGE_ESTIMATE_S = {"cold_start": 150, "audio-separator": 90, "audio-separator compiled fp16": 90,
                    "audio-separator compiled autocast": 90, "stemsep eager": 40, "stemsep compiled": 120,
                    "network": 40, "network compiled": 110, "cold_start_eager": 40, "concurrency": 90}
NEEDED = ["torch", "numpy", "scipy", "soundfile", "yaml", "einops", "av", "soxr", "cog", "coglet", "audio_separator",
          "librosa", "pydub", "onnx2torch", "onnxruntime", "stemsep"]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


class Budget:
    """Seconds left of the run's budget; a stage runs only if its estimate fits."""

    def __init__(self, seconds: float, smoke: bool):
        self.end, self.smoke = time.monotonic() + seconds, smoke

    def left(self) -> float:
        return self.end - time.monotonic()

    def allows(self, stage: str, skipped: dict) -> bool:
        needed = 10 if self.smoke else STAGE_ESTIMATE_S[stage]
        if self.left() >= needed:
            return True
        skipped[stage] = f"skipped: {self.left():.0f} s of the budget left, about {needed} s needed"
        log(f"{stage}: {skipped[stage]}")
        return False


# ---------------------------------------------------------------------------------------------
# inputs


# ---------------------------------------------------------------------------------------------
# stage 1 and 4: the Cog server's cold start


def gpu_memory_used_mb() -> float | None:
    """Memory in use on GPU 0 by every process (nvidia-smi), or None where it cannot say."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20, check=False).stdout
        return float(out.split()[0])
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None


def runner_setup_line(*logs: str) -> str:
    """The runner's "stemsep: ... loaded on ... in X s, warmed up in Y s" line, from the setup
    logs /health-check returns or the server's own log (JSON lines, the text in fields.message)."""
    for text in logs:
        for line in text.splitlines():
            if line.startswith("{"):
                try:
                    line = json.loads(line).get("fields", {}).get("message", "")
                except ValueError:
                    continue
            if "stemsep:" in line and " loaded " in line:
                return line.split("stemsep:", 1)[1].strip()
    return ""


def cold_start(weights: Path, short: Path, compile: bool, device: str, budget: Budget) -> dict:
    from cogserver import start_server

    base_url, files = fixtures.serve_folder(short.parent)
    env = {"STEMSEP_WEIGHTS_DIR": str(weights), "STEMSEP_WORK_DIR": str(WORK / "runner"),
           "STEMSEP_COMPILE": "1" if compile else "0", "STEMSEP_DEVICE": device}
    for name in ("STEMSEP_CHECKPOINT", "STEMSEP_CONFIG"):
        os.environ.pop(name, None)  # the image has neither: the runner reads the weights folder
    log(f"cold start ({'compiled' if compile else 'eager'}): starting the Cog server")
    started = time.perf_counter()
    server = start_server(env, log_dir=WORK, ready_timeout=max(30.0, budget.left()))
    result: dict = {"compile": compile}
    try:
        result["start_to_ready_s"] = time.perf_counter() - started
        health = server.health()
        result["health"] = health.get("status")
        line = runner_setup_line((health.get("setup") or {}).get("logs") or "", server.logs())
        result["runner_setup_line"] = line
        if health.get("status") != "READY":
            raise RuntimeError(f"setup failed:\n{server.logs()[-3000:]}")
        numbers = [float(x) for x in re.findall(r"in (\d+(?:\.\d+)?) s", line)]
        if len(numbers) >= 2:
            result["runner_load_s"], result["runner_warm_up_s"] = numbers[:2]
        result["runner_network_at_ready"] = line.rsplit("network ", 1)[-1] if "network " in line else None
        payload = {"input": {"audio": f"{base_url}/{short.name}"}}

        def predict(label: str) -> str:
            """One sync prediction of the short song; returns the network its logs name."""
            t = time.perf_counter()
            answer = server.predict(payload, timeout=max(30.0, budget.left())).json()
            wall = time.perf_counter() - t
            if answer.get("status") != "succeeded":
                raise RuntimeError(f"{label} prediction {answer.get('status')}: {answer.get('error')}\n{server.logs()[-3000:]}")
            network = re.search(r"network (eager \(compiling failed\)|\w+)", answer.get("logs") or "")
            result[f"{label}_prediction_wall_s"] = wall
            result[f"{label}_prediction_predict_time_s"] = (answer.get("metrics") or {}).get("predict_time")
            result[f"{label}_prediction_network"] = network.group(1) if network else None
            return result[f"{label}_prediction_network"]

        predict("first")
        result["start_to_first_result_s"] = time.perf_counter() - started
        # The network compiles in the background: predictions until one runs compiled (the
        # swap), then one more, entirely compiled.
        while compile and (network := predict("polling")) != "compiled":
            if "failed" in (network or ""):
                raise RuntimeError(f"compiling failed:\n{server.logs()[-3000:]}")
            if budget.left() < 30:
                raise RuntimeError("the compiled network did not take over within the budget")
            time.sleep(1)
        if compile:
            result["start_to_compiled_in_use_s"] = time.perf_counter() - started
        predict("second")
        result["gpu_memory_used_while_serving_mb"] = gpu_memory_used_mb() if device == "cuda" else None
    finally:
        server.stop()
        files.shutdown()
    log(f"cold start ({'compiled' if compile else 'eager'}): READY after {result['start_to_ready_s']:.1f} s, "
        f"first result after {result['start_to_first_result_s']:.1f} s"
        + (f", compiled network in use after {result['start_to_compiled_in_use_s']:.1f} s" if compile else "")
        + f" ({result['runner_setup_line']})")
    return result


# ---------------------------------------------------------------------------------------------
# stage 2: end to end, through separate.py's worker


def end_to_end(files: dict, source: Path, profile, budget: Budget, skipped: dict) -> dict:
    """audio-separator's modes and stemsep eager and compiled on the song, each through
    separate.py's worker in a fresh process; a results row (separate.py's) per stemsep run."""
    from separate import AS, FASTEST_CANDIDATES, compare_vocals, machine, network_work, run_name, run_worker, summarize

    options = dict(overlap=profile.overlap, reps=1, threads=profile.threads, device=profile.device,
                   audio_separator_writer="pydub", precision=None, batch_size=None, wait_idle=None)
    plan = [(AS, AS, False), *((run_name(mode), run_name(mode), False) for mode in FASTEST_CANDIDATES[profile.device]),
            ("stemsep eager", "stemsep", False), ("stemsep compiled", "stemsep", True)]
    runs: dict[str, dict] = {}
    for key, run, compile in plan:
        if not budget.allows(key, skipped):
            continue
        args = SimpleNamespace(**options, compile=compile)
        runs[key] = run_worker(run, source, files["worker"], WORK / "out" / key.replace(" ", "_"), args,
                               timeout=max(30.0, budget.left()))
        log(f"{key}: separate {runs[key]['separate_s']:.2f} s, load {runs[key]['load_s']:.2f} s, "
            f"process {runs[key]['process_wall_s']:.1f} s")
    if AS not in runs:
        return {"runs": runs}
    machine_info = machine(profile.device)
    work = network_work(profile.song_s, profile.overlap, files["config"])
    theirs = {key: [runs[key]] for key, run, _ in plan if run != "stemsep" and key in runs}
    out: dict = {"runs": runs}
    for key in ("stemsep eager", "stemsep compiled"):
        if key in runs:
            compared = {"stemsep": [runs[key]], **theirs}
            out[key.split()[1]] = summarize(profile.song_s, compared, compare_vocals(compared),
                                            SimpleNamespace(**options, compile=key.endswith("compiled")), machine_info, work)
    return out


# ---------------------------------------------------------------------------------------------
# stage 3: the network alone, and what bf16 costs in accuracy


def network_alone(files: dict, source: Path, profile, budget: Budget, skipped: dict) -> dict:
    import numpy as np
    import soundfile as sf
    import torch
    from flops import datasheet_peak_tflops, flops_per_chunk
    from model_forward import matmul_tflops, output, timed

    from stemsep.compilation import compile_regions, compile_whole, snr_db
    from stemsep.separator import Separator
    device = torch.device(profile.device)
    cuda = device.type == "cuda"
    separator = Separator(files["checkpoint"], files["config"], device=profile.device)  # the runner's defaults
    model, batch, cfg = separator.model, separator.batch_size, separator.config
    chunk, rate = cfg.audio.chunk_size, cfg.audio.sample_rate
    mix, song_rate = sf.read(source, dtype="float32", always_2d=True)
    assert song_rate == rate, (song_rate, rate)
    needed = batch * chunk
    mix = np.tile(mix.T, (1, -(-needed // mix.shape[0])))[:, :needed]  # the song's first chunks (repeated if short)
    x = torch.from_numpy(np.ascontiguousarray(mix.reshape(2, batch, chunk).transpose(1, 0, 2))).to(device)
    flops = flops_per_chunk(cfg)
    gpu = torch.cuda.get_device_name(device) if cuda else "cpu"
    result: dict = {"batch": batch, "chunk_s": chunk / rate, "runner_precision": separator.precision, "flops_per_chunk": flops,
                    "device": gpu}
    rows = []

    def measure(label: str, net, dtype, precision: str) -> None:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        seconds, runs = timed([net], x, profile.reps, device, dtype)[0]
        row = {"run": label, "batch": batch, "seconds_per_forward": seconds, "seconds_per_chunk": seconds / batch,
               "tflops": flops * batch / seconds / 1e12, "runs": runs}
        if cuda:
            row["peak_gpu_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
            peak = datasheet_peak_tflops(gpu, precision)
            row["datasheet_peak_tflops"], row["mfu"] = peak, (row["tflops"] / peak if peak else None)
        rows.append(row)
        log(f"network {label}: {row['seconds_per_chunk']:.4f} s per chunk, {row['tflops']:.1f} TFLOP/s"
            + (f", MFU {100 * row['mfu']:.0f}%" if row.get("mfu") else ""))

    measure("fp32 eager", model, None, "fp32")
    reference = output(model, x, device)  # fp32
    measure("bf16 eager", model, torch.bfloat16, "bf16")
    result["snr_bf16_vs_fp32_db"] = snr_db(reference, output(model, x, device, torch.bfloat16))
    # What the runner compiles (regional: each block class once) and the whole network as one
    # graph, each timed from empty compiler caches of its own.
    for mode, build in (("regional", compile_regions), ("whole", compile_whole)):
        if not budget.allows("network compiled", skipped):
            break
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(WORK / "compile_cache" / f"network_{mode}" / "inductor")
        os.environ["TRITON_CACHE_DIR"] = str(WORK / "compile_cache" / f"network_{mode}" / "triton")
        compiled = build(model)
        t = time.perf_counter()
        compiled_out = output(compiled, x, device, torch.bfloat16)  # compiles for this shape
        result[f"compile_{mode}_s"] = time.perf_counter() - t
        result[f"snr_bf16_compiled_{mode}_vs_fp32_db"] = snr_db(reference, compiled_out)
        measure(f"bf16 compiled {mode}", compiled, torch.bfloat16, "bf16")
        del compiled, compiled_out
    if cuda:
        result["matmul_bf16_tflops_measured"] = matmul_tflops(device)
        for row in rows:
            if not row["run"].startswith("fp32"):
                row["fraction_of_measured_matmul"] = row["tflops"] / result["matmul_bf16_tflops_measured"]
    result["timings"] = rows
    del reference, model, separator
    if cuda:
        torch.cuda.empty_cache()

    # The whole pipeline: vocals of stemsep in fp32 and in bf16 on an excerpt (chunking,
    # overlap-add and the instrumental as the mix minus the vocals included).
    excerpt_s = min(30.0, profile.song_s)
    excerpt = sf.read(source, dtype="float32", always_2d=True, frames=int(excerpt_s * rate))[0].T
    vocals = {}
    for precision in ("fp32", "bf16"):
        sep = Separator(files["checkpoint"], files["config"], device=profile.device, precision=precision)
        vocals[precision] = torch.from_numpy(sep.separate_array(excerpt, rate, overlap=profile.overlap)["vocals"])
        del sep
    result["pipeline_excerpt_s"] = excerpt_s
    result["pipeline_vocals_snr_bf16_vs_fp32_db"] = snr_db(vocals["fp32"], vocals["bf16"])
    log(f"SNR against fp32: network bf16 {result['snr_bf16_vs_fp32_db']:.1f} dB"
        + "".join(f", compiled {mode} {result[f'snr_bf16_compiled_{mode}_vs_fp32_db']:.1f} dB" for mode in ("regional", "whole")
                  if f"snr_bf16_compiled_{mode}_vs_fp32_db" in result)
        + f"; vocals of the pipeline {result['pipeline_vocals_snr_bf16_vs_fp32_db']:.1f} dB")
    return result


# ---------------------------------------------------------------------------------------------
# the report


def device_slug(smoke: bool) -> str:
    if smoke:
        return "cpu_smoke"
    import torch

    return re.sub(r"[^a-z0-9]+", "_", torch.cuda.get_device_name().lower()).strip("_")


def environment_info(profile) -> dict:
    import torch

    versions = {}
    for package in ("torch", "triton", "cog", "coglet", "audio-separator", "numpy"):
        try:
            from importlib.metadata import version

            versions[package] = version(package)
        except Exception:  # noqa: BLE001 - absent is fine
            versions[package] = None
    info = {"python": platform.python_version(), "packages": versions, "cpu_cores": os.cpu_count(),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                     check=False).stdout.strip()}
    if torch.cuda.is_available() and profile.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=20, check=False).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            info["driver"] = None
    return info


def markdown(results: dict) -> str:
    from separate import AS, CORRECT_SDR_DB, fmt, how

    env, profile = results["environment"], results["profile"]
    lines = [f"# GPU suite: {env.get('gpu', 'CPU (smoke)')}", "",
             f"`benchmarks/gpu_suite.py{' --smoke' if results['smoke'] else ''}`, {env['date']}, commit {env['commit']}; "
             f"torch {env['packages']['torch']} (CUDA {env.get('cuda', '-')}, driver {env.get('driver', '-')}), "
             f"cog {env['packages']['cog']}, coglet {env['packages']['coglet']}, audio-separator {env['packages']['audio-separator']}. "
             f"Random weights, network {profile['network'] or '1297 (dim 512, depth 12)'}; a music-like song of "
             f"{profile['song_s']:g} s, overlap {profile['overlap']}. Suite wall time {results['suite_wall_s']:.0f} s.", ""]
    if results["smoke"]:
        lines += ["**Smoke run**: tiny network on the CPU with torch.compile switched off; the numbers check the "
                  "suite, they measure nothing.", ""]
    lines += ["## Cold start of the Cog runner", "",
              "setup() loads the weights and warms the eager network up; with compiling on, the network compiles in "
              "the background and takes over between two batches once checked. The first result is the first "
              f"prediction of a {profile['short_s']:g}-s song passed by URL, sent at READY; the compiled network is in "
              "use from the first prediction whose logs say so (predictions sent one after another until then).", "",
              "| | start -> READY | start -> first result (its network) | start -> compiled network in use "
              "| first / last prediction (short song) | runner's own setup line |",
              "|---|---:|---:|---:|---:|---|"]
    for key in ("cold_start", "cold_start_eager"):
        c = results.get(key)
        if isinstance(c, dict):
            lines.append(f"| {'compiled' if c['compile'] else 'eager'} | {fmt(c.get('start_to_ready_s'), '.1f', ' s')} "
                         f"| {fmt(c.get('start_to_first_result_s'), '.1f', ' s')} ({c.get('first_prediction_network')}) "
                         f"| {fmt(c.get('start_to_compiled_in_use_s'), '.1f', ' s')} "
                         f"| {fmt(c.get('first_prediction_wall_s'), '.2f', ' s')} / {fmt(c.get('second_prediction_wall_s'), '.2f', ' s')} "
                         f"| {c.get('runner_setup_line', '')} |")
    e2e = results.get("end_to_end") or {}
    if e2e.get("eager") or e2e.get("compiled"):
        lines += ["", f"## The song end to end ({profile['song_s']:g} s, overlap {profile['overlap']}; the separation call, load apart)", "",
                  "audio-separator at its defaults and in each fast mode tried (separate.py's `AS_MODES`, timed on a "
                  "second separation in the process: the first, one chunk, compiles and warms up, in its load time); its "
                  f"fastest is the fastest mode whose vocals stay within {CORRECT_SDR_DB:g} dB SDR of its default ones.", "",
                  "| run | time | RTF | load | chunks | network TFLOP/s | MFU | CUDA peak allocated | peak RSS "
                  "| a-s default / this | a-s fastest / this | vocals SDR against a-s default |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        first = e2e.get("eager") or e2e.get("compiled")
        rows = [(f"audio-separator 0.47.1 default ({how(first[AS])})", first[AS], None, None)]
        rows += [(f"audio-separator 0.47.1 {mode} ({how(t)})" + (", its fastest" if mode == first["audio_separator_fastest"] else "")
                  + ("" if t["correct"] else ", not correct"), t, None, t["vocals_sdr_vs_default_db"])
                 for mode, t in first["audio_separator_modes_tried"].items()]
        rows += [(f"stemsep {mode} ({how(e2e[mode]['stemsep'])})", e2e[mode]["stemsep"], e2e[mode], e2e[mode]["vocals_sdr_between_tools_db"])
                 for mode in ("eager", "compiled") if e2e.get(mode)]
        for name, t, entry, sdr in rows:
            mfu = f"{100 * t['mfu']:.0f}%" if t.get("mfu") else "-"
            lines.append(f"| {name} | {t['separate_s']:.2f} s | {t['real_time_factor']:.1f}x | {t['load_s']:.1f} s | {t.get('chunks')} "
                         f"| {fmt(t.get('network_tflops'), '.1f')} | {mfu} | {fmt(t.get('cuda_peak_allocated_mb'), '.0f', ' MB')} "
                         f"| {t['peak_rss_mb']:.0f} MB | {fmt(entry and entry['time_ratio_audio_separator_over_stemsep'], '.2f', 'x')} "
                         f"| {fmt(entry and entry['time_ratio_audio_separator_fastest_over_stemsep'], '.2f', 'x')} "
                         f"| {'identical' if t.get('correct') and sdr is None else fmt(sdr, '.1f', ' dB')} |")
    net = results.get("network")
    if isinstance(net, dict):
        lines += ["", f"## The network alone (batch {net['batch']} of the song's {net['chunk_s']:g}-s chunks; "
                  f"{fmt(net['flops_per_chunk'] / 1e12, '.3f')} TFLOP per chunk)", "",
                  "| run | s per chunk | TFLOP/s | MFU (datasheet) | of a measured bf16 matmul | peak GPU allocated |",
                  "|---|---:|---:|---:|---:|---:|"]
        for row in net["timings"]:
            mfu = f"{100 * row['mfu']:.0f}%" if row.get("mfu") else "-"
            frac = f"{100 * row['fraction_of_measured_matmul']:.0f}%" if row.get("fraction_of_measured_matmul") else "-"
            lines.append(f"| {row['run']} | {row['seconds_per_chunk']:.4f} | {row['tflops']:.1f} | {mfu} | {frac} "
                         f"| {fmt(row.get('peak_gpu_allocated_mb'), '.0f', ' MB')} |")
        lines += ["", f"bf16 against fp32: network output {net['snr_bf16_vs_fp32_db']:.1f} dB SNR"
                  + "".join(f" (compiled {mode} {net[f'snr_bf16_compiled_{mode}_vs_fp32_db']:.1f} dB)" for mode in ("regional", "whole")
                            if f"snr_bf16_compiled_{mode}_vs_fp32_db" in net)
                  + f"; vocals of the whole pipeline on an excerpt of {net['pipeline_excerpt_s']:g} s "
                  f"{net['pipeline_vocals_snr_bf16_vs_fp32_db']:.1f} dB."
                  + "".join(f" Compiling {mode} for this shape took {net[f'compile_{mode}_s']:.1f} s (empty caches)."
                            for mode in ("regional", "whole") if f"compile_{mode}_s" in net and not results["smoke"])
                  + (f" A bf16 8192-cube matrix product runs at {net['matmul_bf16_tflops_measured']:.0f} TFLOP/s here." if net.get("matmul_bf16_tflops_measured") else "")]
    conc = results.get("concurrency")
    if isinstance(conc, dict):
        lines += ["", "## Two predictions in flight (COG_MAX_CONCURRENCY=2) against one", "",
                  f"The short song by URL, {conc['one']['songs']} sync predictions from as many clients as the server "
                  "runs at once, eager network.", "",
                  "| in flight | songs per hour | latency median | latency max |", "|---:|---:|---:|---:|"]
        for key in ("one", "two"):
            r = conc[key]
            lines.append(f"| {r['concurrency']} | {r['songs_per_hour']:.0f} | {r['latency_median_s']:.2f} s | {r['latency_max_s']:.2f} s |")
        lines += ["", f"Throughput {100 * conc['throughput_gain']:+.0f}%, median latency {100 * conc['latency_change']:+.0f}%: "
                  + ("adopt (at least +20% with latency no more than 10% worse)." if conc["adopt"] else "do not adopt (the rule: at least +20% songs per hour with median latency no more than 10% worse).")]
    if results["skipped"]:
        lines += ["", "Skipped or failed: " + "; ".join(f"{k}: {v}" for k, v in results["skipped"].items())]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------


def check_environment(profile) -> None:
    missing = [name for name in NEEDED if importlib.util.find_spec(name) is None]
    if shutil.which("ffmpeg") is None:
        missing.append("the ffmpeg binary (audio-separator writes its stems through it)")
    if missing:
        sys.exit("missing: " + ", ".join(missing))
    if profile.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            sys.exit("no CUDA GPU visible (run --smoke on a CPU)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny network, short audio, compile off: checks the suite")
    parser.add_argument("--budget-s", type=float, help="stop starting stages past this many seconds (default 450; smoke 110)")
    args = parser.parse_args()
    profile = PROFILES["smoke" if args.smoke else "full"]
    check_environment(profile)
    budget = Budget(args.budget_s or profile.budget_s, args.smoke)
    started = time.perf_counter()

    # Fresh compiler caches, shared by every process of this run: the first compile is cold,
    # as in a new container.
    cache = WORK / "compile_cache"
    shutil.rmtree(cache, ignore_errors=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache / "inductor")
    os.environ["TRITON_CACHE_DIR"] = str(cache / "triton")
    if args.smoke:
        os.environ["TORCH_COMPILE_DISABLE"] = "1"  # Inductor takes minutes on a small CPU even for the tiny network
        os.environ["OMP_NUM_THREADS"] = str(profile.threads)  # the Cog server's worker too
        import torch

        torch.set_num_threads(profile.threads)

    log(f"writing the model files and the {profile.song_s:g}-s song")
    checkpoint, config = fixtures.model_files(profile.network, profile.chunk_size)
    from separate import worker_files

    files = {"checkpoint": checkpoint, "config": config, "weights_dir": checkpoint.parent,
             "worker": worker_files(checkpoint, config, WORK / "audio_separator_models")}  # what separate.py's workers load
    source, short = fixtures.song(profile.song_s), fixtures.song(profile.short_s)
    results: dict = {"smoke": args.smoke, "profile": vars(profile), "skipped": {}}
    results["environment"] = environment_info(profile)
    skipped = results["skipped"]
    out_json = RESULTS / f"gpu_{device_slug(args.smoke)}.json"

    def save() -> None:
        results["suite_wall_s"] = time.perf_counter() - started
        RESULTS.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(results, indent=2, default=str) + "\n")
        out_json.with_suffix(".md").write_text(markdown(results))

    stages = [
        ("cold_start", lambda: cold_start(files["weights_dir"], short, True, profile.device, budget)),
        ("end_to_end", lambda: end_to_end(files, source, profile, budget, skipped)),
        ("network", lambda: network_alone(files, source, profile, budget, skipped)),
        ("cold_start_eager", lambda: cold_start(files["weights_dir"], short, False, profile.device, budget)),
        ("concurrency", lambda: __import__("concurrency").compare(files["weights_dir"], short, profile.concurrency_songs, profile.device)),
    ]
    for name, stage in stages:
        if name in STAGE_ESTIMATE_S and not budget.allows(name, skipped):  # end_to_end checks per process
            continue
        try:
            results[name] = stage()
        except Exception as exc:  # noqa: BLE001 - keep what the other stages measure
            message = str(exc).strip()
            errors = [l for l in message.splitlines() if re.search(r"error|failed", l, re.IGNORECASE)] or message.splitlines() or [""]
            skipped[name] = f"failed: {type(exc).__name__}: {errors[-1][-400:]}"
            results.setdefault("errors", {})[name] = message[-4000:]
            log(f"{name}: {skipped[name]}")
        save()  # after every stage: a run cut short keeps what it has
    log(f"results: {out_json.relative_to(ROOT)} and .md ({results['suite_wall_s']:.0f} s)")
    print(markdown(results))


if __name__ == "__main__":
    main()
