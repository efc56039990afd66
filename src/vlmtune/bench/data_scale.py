"""`python -m vlmtune.bench.data_scale`: how start-up time and memory grow with a JSONL training split read lazily
(``data.load: lazy``) at 10k, 100k and 1M samples.

The data is generated once (cached in ``$VLMTUNE_CACHE/bench/data_scale/``): ShareGPT records of a question about one
of 16 shared 64x64 shape images (each record's text differs), and the builtin tiny Qwen2-VL processor saved as a
folder. Each measurement runs in a fresh child process:

* **index build** (no index saved; the file in the page cache): ``vlmtune.data.index.load_index`` on the file;
* **start-up** (the index saved): from the child's start (interpreter, imports, processor) to the first training
  batch out of the loader, through the train command's own path: ``load_config`` -> ``load_stage_data`` ->
  ``make_loader`` -> the first batch (batch 8, shuffled);

with the child's peak RSS (``os.wait4``) and its RSS once imports and processor are loaded (what the data adds is
the difference). Each figure is the median of ``--rounds`` children; ratios are against the smallest size of the
same run. ``--upfront N`` also times today's upfront read (every sample checked first) at N samples, for contrast.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from vlmtune.bench.runs import spawn
from vlmtune.bench.setup import bench_dir
from vlmtune.tracking import echo, text_table

SIZES = (10_000, 100_000, 1_000_000)
IMAGES = 16
BATCH = 8
_CHILD = "import sys; from vlmtune.bench.data_scale import child; sys.exit(child(sys.argv[1:]))"


def data_dir() -> Path:
    return bench_dir() / "data_scale"


def ensure_processor(root: Path) -> Path:
    """The builtin tiny Qwen2-VL processor as a folder (a model folder's processor, as users load it)."""
    from vlmtune.builtin.base import builtin_processor

    folder = root / "processor"
    if not (folder / "processor_config.json").is_file():
        builtin_processor().save_pretrained(folder)
    return folder


def ensure_data(root: Path, n: int) -> Path:
    """``n`` records over 16 shared images, written once (a temporary file, then renamed)."""
    from vlmtune.data.shapes import QUESTIONS, random_scene, render_scene

    images = root / "images"
    if not (images / f"{IMAGES - 1}.png").is_file():
        images.mkdir(parents=True, exist_ok=True)
        rng = random.Random(0)
        for k in range(IMAGES):
            render_scene(random_scene(rng)).save(images / f"{k}.png")
    path = root / f"scale-{n}.jsonl"
    if path.is_file():
        return path
    rng = random.Random(n)
    questions = list(QUESTIONS.values())
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for i in range(n):
            record = {
                "messages": [
                    {"role": "user", "content": f"<image>{rng.choice(questions)} (sample {i})"},
                    {"role": "assistant", "content": f"answer {rng.randrange(10**6)}"},
                ],
                "images": [f"images/{rng.randrange(IMAGES)}.png"],
            }
            f.write(json.dumps(record) + "\n")
    os.replace(tmp, path)
    return path


def _rss() -> int:
    """This process's resident memory now, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def child(argv: list[str]) -> int:
    """One measurement in this (fresh) process: ``index PATH`` or ``start PATH PROCESSOR LOAD``; prints JSON."""
    mode, path = argv[0], Path(argv[1])
    if mode == "index":
        from vlmtune.data.index import load_index

        start = time.perf_counter()
        index = load_index(path, echo=lambda _: None)
        out = {"build_s": time.perf_counter() - start, "records": len(index), "index_bytes": index.nbytes}
    else:
        from transformers import AutoProcessor

        from vlmtune.config.load import load_config
        from vlmtune.config.stages import resolve_stages
        from vlmtune.train.loader import load_stage_data, make_loader

        processor = AutoProcessor.from_pretrained(argv[2])
        ready, base_rss = time.time(), _rss()
        overrides = [f"data.train={path}", "data.eval=null", f"data.load={argv[3]}", "data.max_length=256"]
        (data,) = load_stage_data(resolve_stages(load_config(None, overrides)), processor)
        loader = make_loader(data.train, processor, BATCH, True, 0, 0)
        batch = next(iter(loader))
        out = {"batch_at": time.time(), "ready_at": ready, "base_rss": base_rss, "rows": len(batch["input_ids"])}
    print("RESULT " + json.dumps(out))
    return 0


def _run_child(args: list[str], log: Path) -> tuple[dict, float, int]:
    """(the child's result, the wall time it was started at, its peak RSS in bytes)."""
    started = time.time()
    _, peak = spawn([sys.executable, "-c", _CHILD, *args], log)
    line = next(x for x in reversed(log.read_text().splitlines()) if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT ")), started, peak


def measure(path: Path, processor: Path, load: str, rounds: int, logs: Path) -> dict:
    """Index build (cold) and start-up (index saved) of one file, median over ``rounds`` children each."""
    from vlmtune.data.index import index_paths

    builds, starts, readies, peaks, data_rss = [], [], [], [], []
    index = {}
    for r in range(rounds if load == "lazy" else 0):
        for saved in index_paths(path):
            saved.unlink(missing_ok=True)
        index, _, _ = _run_child(["index", str(path)], logs / f"index-{path.stem}-{r}.log")
        builds.append(index["build_s"])
    for r in range(rounds):
        got, started, peak = _run_child(["start", str(path), str(processor), load], logs / f"start-{path.stem}-{r}.log")
        starts.append(got["batch_at"] - started)
        readies.append(got["ready_at"] - started)
        peaks.append(peak)
        data_rss.append(peak - got["base_rss"])
    med = statistics.median
    return {
        "samples": sum(1 for _ in path.open("rb")),
        "load": load,
        "index_build_s": med(builds) if builds else None,
        "index_bytes_per_sample": index["index_bytes"] / index["records"] if index else None,
        "index_file_bytes": path.with_name(f".{path.name}.vlmtune-index.safetensors").stat().st_size
        if load == "lazy"
        else None,
        "startup_s": med(starts),
        "imports_and_processor_s": med(readies),
        "peak_rss": med(peaks),
        "data_rss": med(data_rss),
    }


def table(rows: list[dict]) -> list[str]:
    """The results with ratios against the first lazy row."""
    base = next(r for r in rows if r["load"] == "lazy")
    out = [
        (
            "samples",
            "load",
            "index build s",
            "index B/sample",
            "start-up s (to 1st batch)",
            "of it imports+processor s",
            "of it data s",
            "peak RSS MiB",
            "RSS over imports MiB",
            "x samples",
            "x start-up",
            "x peak RSS",
            "x RSS over imports",
        )
    ]
    for r in rows:
        out.append(
            (
                f"{r['samples']:,}",
                r["load"],
                f"{r['index_build_s']:.3f}" if r["index_build_s"] is not None else "-",
                f"{r['index_bytes_per_sample']:.1f}" if r["index_bytes_per_sample"] is not None else "-",
                f"{r['startup_s']:.2f}",
                f"{r['imports_and_processor_s']:.2f}",
                f"{r['startup_s'] - r['imports_and_processor_s']:.2f}",
                f"{r['peak_rss'] / 2**20:.0f}",
                f"{r['data_rss'] / 2**20:.0f}",
                f"{r['samples'] / base['samples']:g}",
                f"{r['startup_s'] / base['startup_s']:.2f}",
                f"{r['peak_rss'] / base['peak_rss']:.2f}",
                f"{r['data_rss'] / base['data_rss']:.2f}",
            )
        )
    return text_table(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlmtune.bench.data_scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="samples per generated file")
    parser.add_argument("--rounds", type=int, default=3, help="children per measurement (the median is shown)")
    parser.add_argument("--upfront", type=int, nargs="*", default=[SIZES[0]], help="sizes also read upfront")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    root = data_dir()
    root.mkdir(parents=True, exist_ok=True)
    processor = ensure_processor(root)
    rows = []
    with tempfile.TemporaryDirectory() as logs:
        for n in sorted(args.sizes):
            echo(f"data_scale: {n:,} samples ...")
            path = ensure_data(root, n)
            rows.append(measure(path, processor, "lazy", args.rounds, Path(logs)))
        for n in args.upfront:
            echo(f"data_scale: {n:,} samples read upfront ...")
            rows.append(measure(ensure_data(root, n), processor, "upfront", 1, Path(logs)))
    echo("\n".join(table(rows)))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
