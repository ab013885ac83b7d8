"""The camvid classifier's training step (EfficientNet-Lite0 forward + backward + AdamW,
batch 16 at 224 px, synthetic tensors already in memory) with glibc's default allocator and
with ``allocator.tune_allocator()``, each in a fresh process: seconds, minor page faults and
system time per iteration.

    python benchmarks/bench_allocator.py [--iterations 15]
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = __file__.rsplit("/benchmarks/", 1)[0]


def measure(tuned: bool, iterations: int) -> dict:
    if tuned:
        from model_training.common.allocator import tune_allocator
        assert tune_allocator(), "mallopt not available (not glibc?)"
    import timm
    import torch
    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0", num_classes=7, pretrained=False)
    optimizer = torch.optim.AdamW(model.parameters(), 1e-3)
    images, targets = torch.randn(16, 3, 224, 224), torch.rand(16, 7)

    def step():
        optimizer.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(model(images), targets).backward()
        optimizer.step()

    for _ in range(3):  # warm-up: the allocator's steady state
        step()
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(iterations):
        step()
    seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    return {"s_per_iter": round(seconds / iterations, 3),
            "faults_per_iter": round((after.ru_minflt - before.ru_minflt) / iterations),
            "sys_s_per_iter": round((after.ru_stime - before.ru_stime) / iterations, 3),
            "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=15)
    parser.add_argument("--one", choices=["default", "tuned"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one == "tuned", args.iterations)))
        return
    results = {}
    for name in ("default", "tuned"):  # one after the other: never two torch jobs at once
        out = subprocess.run([sys.executable, __file__, "--one", name, "--iterations",
                              str(args.iterations)], capture_output=True, text=True, check=True,
                             cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{name:8s} {results[name]}")
    results["speedup"] = round(results["default"]["s_per_iter"] / results["tuned"]["s_per_iter"], 2)
    print(json.dumps({"bench": "allocator", **results}))


if __name__ == "__main__":
    main()
